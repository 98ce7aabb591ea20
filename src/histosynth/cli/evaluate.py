"""`histosynth evaluate captions|masks|realism` and `histosynth experiment mix`: the thesis' questions
(and label fidelity of mask-conditioned generation) as commands, each writing a report folder
(report.md, CSVs, PNGs)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import typer

from .. import validation
from ..errors import ConfigError
from .common import (
    DeviceOption,
    OptionBlock,
    ProgressOption,
    SchemaOption,
    SegmenterTraining,
    coverage_option,
    expand_blocks,
    schema_from_option,
    seed_option,
    segment_train_config,
)

if TYPE_CHECKING:
    from ..evaluate.caption_accuracy import SegmentFn
    from ..schema import ClassSchema
    from ..segment.external import AnySegmenter


@dataclass(frozen=True)
class Segmenting:
    """How a command segments images: the multi-class segmenter (a folder, or an exported network with its JSON)
    or the masks another model predicted, coverage, batch size, device and progress bars of `evaluate captions`,
    `evaluate masks` and `select-pairs`."""

    segmenter: Optional[Path]
    coverage: str
    batch_size: int
    device: str
    progress: bool
    config: Optional[Path] = None
    predicted_masks: Optional[Path] = None

    def check(self) -> None:
        """A ConfigError for a coverage or batch size the segmenter cannot use, or for no judge or two
        (before anything is read)."""
        check_coverage(self.coverage)
        validation.positive_int(self.batch_size, "--batch-size")
        if (self.segmenter is None) == (self.predicted_masks is None):
            raise ConfigError("give the judge of the images: --segmenter MODEL (a segmenter folder or an exported "
                              "network) or --predicted-masks DIR (your model's label PNGs), one of them")
        if self.config is not None and self.segmenter is None:
            raise ConfigError("--segmenter-config goes with --segmenter FILE (an exported network)")

    def load(self, schema: Optional[ClassSchema] = None) -> AnySegmenter:
        """The segmenter, or the predicted masks (holding ids of ``schema``, default: renal)."""
        from ..schema import load_schema
        from ..segment.external import PredictedMasks, load_segmenter

        if self.predicted_masks is not None:
            masks = PredictedMasks(self.predicted_masks, load_schema(schema))
            masks.check()
            return masks
        return load_segmenter(self.segmenter, self.config)

    def function(self, segmenter: AnySegmenter, progress: Optional[bool] = None,
                 images: Sequence[Path] = (), root: Optional[Path] = None) -> SegmentFn:
        """The loaded segmenter as a function of a batch of images (progress bars: ``progress``, else --progress).

        Predicted masks are those of ``images`` (found by their paths below ``root``), in this order.
        """
        from ..evaluate.caption_accuracy import segmenter_function
        from ..segment.external import PredictedMasks

        if isinstance(segmenter, PredictedMasks):
            return segmenter.function(images, root, self.coverage)
        return segmenter_function(segmenter, self.coverage, self.device, self.batch_size,
                                  self.progress if progress is None else progress)

    def describe(self, segmenter: AnySegmenter) -> str:
        """The segmenter and its folder or file, for a report."""
        if self.predicted_masks is not None:
            return segmenter.describe()
        return f"{segmenter.describe()} ({self.segmenter})"


#: --segmenter's help: what it accepts.
SEGMENTER_FORMS = ("a segmenter folder, or a TorchScript (.pt) / torch.export (.pt2) file with its JSON "
                   "(<file>.json or --segmenter-config)")


def segmenting(coverage: str, segmenter: str = "the multi-class segmenter", predicted: bool = True) -> OptionBlock:
    """The options of :class:`Segmenting`; the commands differ in the default --coverage, in what they say the
    segmenter does (``segmenter``) and in whether masks predicted elsewhere may judge instead (``predicted``)."""

    def options(
        segmenter: Optional[Path] = typer.Option(None, "--segmenter", help=f"{segmenter}: {SEGMENTER_FORMS}"),
        segmenter_config: Optional[Path] = typer.Option(
            None, "--segmenter-config", help="JSON of an exported --segmenter network: class_ids, normalisation, "
                                             "padding, input_size (default: <file>.json beside it)"),
        coverage: str = coverage_option(coverage),
        batch_size: int = typer.Option(8, "--batch-size", help="images per batch"),
        device: str = DeviceOption,
        progress: bool = ProgressOption,
    ) -> Segmenting:
        return Segmenting(segmenter, coverage, batch_size, device, progress, config=segmenter_config)

    block = OptionBlock(options)
    if not predicted:
        return block

    def options_or_masks(
        segmenting: Segmenting = block,
        predicted_masks: Optional[Path] = typer.Option(
            None, "--predicted-masks", help="instead of --segmenter: label PNGs (class ids) your own model predicted, "
                                            "one per image with its path or file stem"),
    ) -> Segmenting:
        return replace(segmenting, predicted_masks=predicted_masks)

    return OptionBlock(options_or_masks)


CaptionSegmenting = segmenting("thesis")
MaskSegmenting = segmenting("full")
SelectionSegmenting = segmenting("full", segmenter="the multi-class segmenter that chooses (judge the result with "
                                                   "another one)", predicted=False)


def register(app: typer.Typer) -> None:
    evaluate = typer.Typer(help="Evaluate generated images: caption accuracy, label fidelity, realism.",
                           no_args_is_help=True)
    evaluate.command("captions")(captions)
    evaluate.command("masks")(masks)
    evaluate.command("realism")(realism)
    app.add_typer(evaluate, name="evaluate")
    app.command("select-pairs")(select_pairs)
    experiment = typer.Typer(help="Experiments with real and synthetic training data.", no_args_is_help=True)
    experiment.command("mix")(mix)
    app.add_typer(experiment, name="experiment")


@expand_blocks
def captions(
    segmenting: Segmenting = CaptionSegmenting,
    out: Path = typer.Option(..., "--out", help="report folder"),
    images: Optional[Path] = typer.Option(
        None, "--images", help="folder of generated images (+ manifest with captions)"),
    model: Optional[Path] = typer.Option(None, "--model", help="model folder to generate the images from"),
    caption: Optional[str] = typer.Option(
        None, "--caption", help="the requested caption (default with --model: the thesis' generating caption; with "
                                "--images: from the manifest)"),
    n: Optional[int] = typer.Option(None, "--n", help="number of images (default: all in --images; 400 with --model)"),
    seed: int = seed_option("seed of the choice of images and of the generation job"),
    schema: Optional[str] = SchemaOption,
) -> None:
    """Segment generated images, re-caption them and compare with the caption they were asked for."""
    from ..captions import GENERATING_CAPTION
    from ..evaluate.caption_accuracy import (
        THESIS_MENTION_SHARE,
        evaluate_caption_accuracy,
        generate_caption_job,
        write_caption_accuracy_report,
    )
    from ..evaluate.images import choose, read_generated
    from ..segment.predict import read_rgb

    _images_or_model(images, model, "DIR (generated images)")
    segmenting.check()
    _check_n_and_seed(n, seed)
    seg = segmenting.load(schema_from_option(schema) if schema else None)
    class_schema = seg.schema if schema is None else schema_from_option(schema)
    seg.check_schema(class_schema, f"schema {schema}" if schema else "the evaluation")
    if model is not None:
        from ..sample.jobs import Shard

        requested = (caption or GENERATING_CAPTION).replace("\\n", "\n")
        shard, count = Shard.from_environment(), n or 400
        items = generate_caption_job(model, requested, count, seed, out / "images", device=segmenting.device,
                                     shard=shard, progress=segmenting.progress)
        if len(items) < count:  # other shards' images are still to come
            typer.echo(f"shard {shard}: {len(items)} of {count} images are in {out / 'images'}; evaluate once all "
                       "shards have run")
            return
        source = f"generated now from {model} ({out / 'images'})"
    else:
        found, source = read_generated(images, caption.replace("\\n", "\n") if caption else None)
        items = choose(found, n, seed, str(images))
    segment = segmenting.function(seg, images=[i.path for i in items], root=out / "images" if model else images)
    result = evaluate_caption_accuracy([read_rgb(i.path) for i in items], [i.caption for i in items], segment,
                                       class_schema, names=[i.path.name for i in items])
    path = write_caption_accuracy_report(result, out, coverage=segmenting.coverage, caption_source=source,
                                         segmenter=segmenting.describe(seg))
    if result.group:
        typer.echo(f"{len(result)} images: {result.mention_share():.1f} % mention glomeruli "
                   f"(thesis {THESIS_MENTION_SHARE} %); exact caption match {result.exact_match_share():.1f} %")
    typer.echo(f"wrote {path}")


@expand_blocks
def masks(
    segmenting: Segmenting = MaskSegmenting,
    out: Path = typer.Option(..., "--out", help="report folder (images generated now go to OUT/job)"),
    images: Optional[Path] = typer.Option(None, "--images", help="a generation job made from masks (images/ + masks/), "
                                          "or a folder of images scored against the --mask / --masks-from masks "
                                          "of the same name"),
    model: Optional[Path] = typer.Option(
        None, "--model", help="mask-conditioned model folder to generate the images from"),
    masks_from: Optional[Path] = typer.Option(None, "--masks-from", help="the masks of this patch dataset (with "
                                              "--images: the patch named like each image)"),
    split: Optional[str] = typer.Option(None, "--split", help="with --masks-from: only this split (default: all)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="a label mask PNG or a folder of them (with --images: "
                                        "the mask of the same file stem)"),
    n: Optional[int] = typer.Option(None, "--n", help="number of images (default: all masks / all images of the job)"),
    seed: int = seed_option("seed of the choice of masks and of the generation job"),
    steps: Optional[int] = typer.Option(None, "--steps", help="with --model: denoising steps (default: the model's)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="with --model: text guidance scale "
                                             "(default: the model's)"),
    mask_guidance: Optional[float] = typer.Option(None, "--mask-guidance", help="with --model: mask guidance "
                                                  "scale (see generate) (default: the model's)"),
    mask_captions: bool = typer.Option(False, "--mask-captions", help="with --model: caption each image from its mask "
                                       "(default: the empty caption, the mask alone)"),
    min_share: float = typer.Option(0.01, "--min-share", help="classes below this share of the mask pixels are left "
                                    "out of the mean Dice"),
    schema: Optional[str] = typer.Option(None, "--schema", help="with --predicted-masks: the class schema of their "
                                         "ids, 'renal' (default) or a YAML file", show_default=False),
) -> None:
    """Label fidelity: segment images generated from masks and score them (Dice per class) against their masks."""
    from ..evaluate.label_fidelity import (
        TARGET_MEAN_DICE,
        evaluate_mask_job,
        generate_mask_job,
        pair_by_name,
        read_mask_job,
        write_label_fidelity_report,
    )
    from ..sample.jobs import is_job_folder

    _images_or_model(images, model, "JOB (images generated from masks)")
    if model is not None and (mask is None) == (masks_from is None):
        raise ConfigError("with --model give the masks to generate from: --masks-from DATASET or --mask PATH")
    given_masks = mask if mask is not None else masks_from
    if images is not None and given_masks is not None and (mask is None) == (masks_from is None):
        raise ConfigError("give either --mask or --masks-from, not both")
    if images is not None and is_job_folder(images) and given_masks is not None:
        raise ConfigError("--images is a finished job with its own masks; leave out --mask / --masks-from")
    if images is not None and not is_job_folder(images) and given_masks is None:
        raise ConfigError(f"{images} is not a generation job: give the masks of its images with --mask DIR "
                          "or --masks-from DATASET")
    segmenting.check()
    _check_n_and_seed(n, seed)
    if steps is not None:  # None: the model's own
        validation.positive_int(steps, "--steps")
    for value, name in ((guidance, "--guidance"), (mask_guidance, "--mask-guidance")):
        if value is not None:
            validation.finite_float(value, name, low=0)
    validation.share(min_share, "--min-share")
    seg = segmenting.load(schema_from_option(schema) if schema else None)
    job = images
    if model is not None:
        from .generate import job_captions, masks_from_options, model_settings

        model_schema, options = model_settings(model, steps=steps, guidance=guidance, mask_guidance=mask_guidance)
        seg.check_schema(model_schema, f"model {model}")
        chosen = masks_from_options(model_schema, mask, masks_from, split, n, seed)
        captions = job_captions(model_schema, None, None, None, chosen, mask_captions)
        job = generate_mask_job(model, chosen, out / "job", options, seed, captions, device=segmenting.device,
                                batch_size=segmenting.batch_size, progress=segmenting.progress)
        n = None  # the job holds exactly the chosen masks
    if model is None and given_masks is not None:
        pairs, source = pair_by_name(images, given_masks, n, seed)
        root = images
    else:
        pairs, source = read_mask_job(job, n, seed)
        root = job
    segment = segmenting.function(seg, images=[p.image for p in pairs], root=root)
    result, pictures, masks_read, predictions = evaluate_mask_job(pairs, segment, seg.schema, min_share)
    examples = list(zip(masks_read, pictures, predictions, strict=True))
    path = write_label_fidelity_report(result, out, examples, source=source, segmenter=segmenting.describe(seg),
                                       coverage=segmenting.coverage)
    typer.echo(f"{len(result)} images: mean Dice {result.mean_dice():.3f} over classes with >= {min_share:.1%} of "
               f"the mask pixels (target {TARGET_MEAN_DICE})")
    typer.echo(f"wrote {path}")


@expand_blocks
def select_pairs(
    jobs: list[Path] = typer.Argument(..., help="generation jobs made from the same masks, each with its own --seed"),
    segmenting: Segmenting = SelectionSegmenting,
    out: Path = typer.Option(..., "--out", help="folder for images/ and masks/ of the kept pairs and selection.csv"),
) -> None:
    """Keep, per mask, the generated image a segmenter reads closest to its mask (best of several seeds)."""
    from ..evaluate.selection import check_output_folder, read_candidates, select_best, summary, write_selection

    segmenting.check()
    check_output_folder(out)
    candidates = read_candidates(jobs)
    seg = segmenting.load()
    selection = select_best(candidates, segmenting.function(seg, progress=False), seg.schema, segmenting.progress)
    write_selection(selection, out, jobs, segmenting.describe(seg))
    typer.echo(summary(selection))
    typer.echo(f"wrote {out}/images, {out}/masks and {out}/selection.csv")


def realism(
    real: Path = typer.Option(..., "--real", help="real patches: a patch dataset or a folder of images"),
    synthetic: Path = typer.Option(..., "--synthetic", help="synthetic patches: a patch dataset or a folder"),
    out: Path = typer.Option(..., "--out", help="report folder"),
    train: Optional[Path] = typer.Option(None, "--train", help="the generator's training patches (memorisation check)"),
    extractor: Optional[Path] = typer.Option(
        None, "--extractor", help="local feature extractor for FID/KID: a torch.export .pt2 or TorchScript file (never "
                                  "downloaded)"),
    n: Optional[int] = typer.Option(None, "--n", help="images drawn from each set (default: all)"),
    real_split: Optional[str] = typer.Option(
        None, "--real-split", help="use only this split of a real patch dataset (e.g. test)"),
    folds: int = typer.Option(5, "--folds"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap rounds of the AUC interval"),
    seed: int = seed_option("seed of the choice of images, the folds and the bootstrap"),
    device: str = DeviceOption,
) -> None:
    """Classifier two-sample test (ROC AUC), FID/KID with your extractor, and a memorisation check."""
    from ..evaluate.images import choose, image_paths, load_images
    from ..evaluate.realism import check_realism_options, evaluate_realism, load_feature_extractor, write_realism_report

    check_realism_options(folds, seed, bootstrap)
    _check_n_and_seed(n, seed)

    def images_of(source: Path, what: str, split: str | None = None):
        return load_images(choose(image_paths(source, split), n, seed, str(source)), what)

    net = load_feature_extractor(extractor) if extractor is not None else None
    result = evaluate_realism(
        images_of(real, "the real images", real_split), images_of(synthetic, "the synthetic images"),
        training=images_of(train, "the training images") if train is not None else None,
        extractor=net, folds=folds, seed=seed, bootstrap=bootstrap, device=device, progress=True,
    )
    sources = {"real": str(real) + (f" ({real_split} split)" if real_split else ""), "synthetic": str(synthetic)}
    if train is not None:
        sources["training"] = str(train)
    if extractor is not None:
        sources["feature extractor"] = str(extractor)
    path = write_realism_report(result, out, sources)
    test = result.two_sample
    typer.echo(f"two-sample ROC AUC {test.auc:.3f} ({test.confidence:.0%} CI {test.ci_low:.3f}-{test.ci_high:.3f}): "
               f"{test.verdict()}")
    typer.echo(f"wrote {path}")


@expand_blocks
def mix(
    real: Path = typer.Option(..., "--real", help="real patch dataset (its 'train' rows are used)"),
    synthetic: Path = typer.Option(..., "--synthetic", help="synthetic patch dataset (all rows)"),
    out: Path = typer.Option(..., "--out", help="experiment folder (runs, logs, report)"),
    val: Optional[Path] = typer.Option(
        None, "--val", help="real validation dataset (all rows; best larger than any training set); "
                            "default: --real's 'val' rows"),
    seeds: str = typer.Option("5", "--seeds", help="number of seeds (5 = seeds 0-4) or a list (0,5,7)"),
    design: str = typer.Option(
        "splits", "--design", help="splits: the thesis' six real/synthetic splits of N patches; curve: the scarcity "
                                   "curve (--real-counts x --synthetic-multiples, and synthetic alone)"),
    splits: Optional[str] = typer.Option(None, "--splits", help="subset of 100_0,75_25,50_50,25_75,0_100,100_100"),
    n: Optional[int] = typer.Option(None, "--n", help="patches per split (default: min of real and synthetic)"),
    real_counts: str = typer.Option("12,24,48,96", "--real-counts", help="curve: real patch counts"),
    synthetic_multiples: str = typer.Option(
        "0,1,4", "--synthetic-multiples", help="curve: synthetic patches added per real patch"),
    synthetic_only: bool = typer.Option(
        True, "--synthetic-only/--no-synthetic-only", help="curve: also train on R synthetic patches alone"),
    weights: str = typer.Option(
        "best", "--weights", help="judge the best weights (by --monitor) or the final ones (as the thesis)"),
    equal_steps: bool = typer.Option(
        False, "--equal-steps/--equal-epochs", help="every arm trains the optimiser steps of the largest arm's "
        "--epochs (smaller arms more epochs; warm-up and validation interval scaled alike), or the same epochs"),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="i/n: train runs i, i+n, ... only (several processes share the folder); run again "
                              "without it once all are done, for the report"),
    reuse_runs_from: Optional[list[Path]] = typer.Option(
        None, "--reuse-runs-from", help="another experiment's folder (repeatable): a run it holds with the same "
        "data rows, validation rows, training loop and seed (the real-only arm on the same real data, say) is "
        "copied instead of trained again"),
    training: dict = SegmenterTraining,
    progress: bool = ProgressOption,
) -> None:
    """Real and synthetic training data: the six-split experiment (thesis Table 5.2) or the scarcity curve,
    each arm against real-only paired by seed (mean difference, bootstrap interval, paired tests)."""
    from ..data.dataset import open_dataset
    from ..evaluate.mix import (
        TRAINING_DEFAULTS,
        MixSources,
        mix_config,
        run_mix_experiment,
        scarce_class_warning,
        write_mix_report,
    )
    from ..sample.jobs import Shard

    config = mix_config(splits, seeds, n, segment_train_config(training, TRAINING_DEFAULTS), design=design,
                        real_counts=real_counts, synthetic_multiples=synthetic_multiples,
                        synthetic_only=synthetic_only, weights=weights, equal_steps=equal_steps)
    sources = MixSources.from_datasets(open_dataset(real), open_dataset(synthetic),
                                       open_dataset(val) if val is not None else None)
    warning = scarce_class_warning(sources.presence(config.train.class_name), config.train.class_name)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    result = run_mix_experiment(sources, config, out, progress=progress,
                                shard=Shard.parse(shard) if shard else Shard(), reuse=reuse_runs_from or ())
    if result.missing:
        typer.echo(f"{len(result.runs)} runs on disk, {result.missing} left to other shards; once they are done, "
                   "run the command again without --shard to write the report")
        return
    path = write_mix_report(result, out)
    for _, row in result.final_table().iterrows():
        typer.echo(f"{row['experiment']:>9}: Dice {row['Dice mean']:.4f} (val loss {row['val loss mean']:.4f}), "
                   f"collapsed {row['collapsed']} of {row['seeds']}")
    for _, row in result.paired_table().iterrows():
        typer.echo(f"{row['experiment']:>9} - {row['baseline']}: {row['mean']:+.4f} "
                   f"(95 % CI {row['ci_low']:+.4f} to {row['ci_high']:+.4f}; paired t p {row['t_p']:.3g}, "
                   f"Wilcoxon p {row['wilcoxon_p']:.3g})")
    collapse = result.collapse()
    typer.echo(f"collapsed runs: {collapse['collapsed']} of {collapse['runs']}")
    typer.echo(f"wrote {path}")


def _images_or_model(images: Optional[Path], model: Optional[Path], images_are: str) -> None:
    """The images to evaluate come from one source: made already (--images) or generated now (--model)."""
    if (images is None) == (model is None):
        raise ConfigError(f"give either --images {images_are} or --model DIR (generate them now)")


def _check_n_and_seed(n: Optional[int], seed: int) -> None:
    from ..evaluate.images import check_choice

    check_choice(n, seed)


def check_coverage(coverage: str) -> None:
    """A segmenter coverage the toolkit knows, or a ConfigError that lists them."""
    from ..segment.predict import COVERAGES

    if coverage not in COVERAGES:
        raise ConfigError(f"unknown --coverage {coverage!r}; use one of {', '.join(COVERAGES)}")
