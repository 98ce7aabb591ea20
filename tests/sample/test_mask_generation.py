"""Generating from label masks: the guidance formula, images of the masks' size, jobs that keep
image/mask pairs (resumable, sharded), the `generate --mask/--masks-from` command and its errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.cli import main
from histosynth.data.dataset import Patch, PatchDatasetWriter
from histosynth.errors import ConfigError, DataError, JobError, ModelError
from histosynth.io import write_png_atomic
from histosynth.models.bundle import load_bundle
from histosynth.models.label_maps import label_map
from histosynth.sample.generate import SamplingOptions, generate
from histosynth.sample.jobs import JOB_FILE, Job, Shard, item_seed, new_job, run_job
from histosynth.sample.masks import ConditioningMask
from histosynth.sample.sampler import Conditions, guided_eps
from histosynth.schema import RENAL

_spec = importlib.util.spec_from_file_location("maskmodels", Path(__file__).with_name("maskmodels.py"))
maskmodels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maskmodels)

OPTIONS = SamplingOptions(steps=2, mask_guidance=2.0)
GLOMERULI = "This image showcases various types of tissue structures found in renal tissue.\n" \
            "The image shows a low amount of Glomeruli."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mask_bundle_path(tmp_path_factory):
    return maskmodels.make_mask_bundle(tmp_path_factory.mktemp("models") / "mask")


@pytest.fixture(scope="module")
def mask_bundle(mask_bundle_path):
    return load_bundle(mask_bundle_path)


def blob_mask(height: int, width: int, seed: int) -> np.ndarray:
    """Other tissue with a glomerulus and a tubulus somewhere."""
    rng = np.random.default_rng(seed)
    mask = np.full((height, width), 6, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for class_id in (4, 3):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(8, 20)) ** 2] = class_id
    return mask


# --- the guidance formula ----------------------------------------------------------------------------
@torch.no_grad()
def test_text_and_mask_guidance_follow_the_documented_formula(mask_bundle):
    unet = mask_bundle.unet
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    cond, uncond = torch.randn(2, 6, 384, generator=generator), torch.randn(1, 2, 384, generator=generator)
    maps = label_map(np.stack([blob_mask(64, 64, 1), blob_mask(64, 64, 2)]), RENAL.ids, 4)
    t = torch.tensor(400)

    def e(context, extra):
        return unet(torch.cat([x, extra], 1), t, encoder_hidden_states=context.expand(2, -1, -1)).sample

    e_u0, e_uM, e_cM = e(uncond, torch.zeros_like(maps)), e(uncond, maps), e(cond, maps)
    batches = []
    hook = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        both = guided_eps(unet, x, t, Conditions(cond, uncond, label_maps=maps), 1.5, mask_guidance=2.0)
        text_only = guided_eps(unet, x, t, Conditions(cond, uncond, label_maps=maps), 1.5, mask_guidance=1.0)
        unconditional = Conditions(uncond.expand(2, -1, -1), label_maps=maps)
        mask_only = guided_eps(unet, x, t, unconditional, 1.5, mask_guidance=2.0)
    finally:
        hook.remove()
    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(both, e_u0 + 2.0 * (e_uM - e_u0) + 1.5 * (e_cM - e_uM), **tolerance)
    torch.testing.assert_close(text_only, e_uM + 1.5 * (e_cM - e_uM), **tolerance)
    torch.testing.assert_close(mask_only, e_u0 + 2.0 * (e_uM - e_u0), **tolerance)
    assert batches == [6, 4, 4]  # one UNet call each, on just the predictions the formula needs


# --- generate() -------------------------------------------------------------------------------------
def test_images_take_their_masks_size_and_follow_their_masks(mask_bundle):
    masks = [blob_mask(64, 96, 1), blob_mask(64, 96, 2), blob_mask(64, 96, 1)]
    made = generate(mask_bundle, ["", "", ""], [5, 5, 5], OPTIONS, masks=masks, batch_size=3)
    assert made.images.shape == (3, 64, 96, 3)  # wider than the 64 px window: denoised in blended windows
    np.testing.assert_array_equal(made.images[0], made.images[2])  # same mask and seed: same image
    assert np.abs(made.images[0].astype(int) - made.images[1]).mean() > 1  # another mask, another image
    assert made.records[1] == {"caption": "", "seed": 5, "steps": 2, "guidance": 1.5, "scheduler": "ddim",
                               "model_id": mask_bundle.id, "height": 64, "width": 96, "mask_guidance": 2.0}
    # a text+mask model also generates from text alone (the null map it was trained with when masks dropped)
    assert generate(mask_bundle, [GLOMERULI], [5], SamplingOptions(steps=1)).images.shape == (1, 64, 64, 3)


def test_what_cannot_be_generated_from_masks(mask_bundle, tiny_bundle, tmp_path):
    mask = blob_mask(64, 64, 0)
    with pytest.raises(ModelError, match=r"is not mask-conditioned \(it reads text only\); generate from masks "
                                         r"with a model trained with --condition mask or text\+mask$"):
        generate(tiny_bundle, [""], [1], SamplingOptions(steps=1), masks=[mask])
    wrong = mask.copy()
    wrong[0, 0] = 9
    with pytest.raises(DataError, match=r"^mask 0: mask ids \[9\] are not classes of the model"):
        generate(mask_bundle, [""], [1], SamplingOptions(steps=1), masks=[wrong])
    with pytest.raises(ConfigError, match=r"image size 66 px must be a multiple of 4"):
        generate(mask_bundle, [""], [1], SamplingOptions(steps=1), masks=[np.full((66, 64), 6, np.uint8)])
    mask_only = load_bundle(maskmodels.make_mask_bundle(tmp_path / "mask-only", condition="mask"))
    with pytest.raises(ConfigError, match=r"is conditioned on masks only; generate without a caption$"):
        generate(mask_only, [GLOMERULI], [1], SamplingOptions(steps=1), masks=[mask])


# --- jobs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_masks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masks")
    for i in range(3):
        write_png_atomic(folder / f"layout-{i}.png", blob_mask(64, 64, 10 + i))
    return folder


def conditioning_masks(folder: Path) -> list[ConditioningMask]:
    from histosynth.sample.masks import read_masks

    return read_masks(folder, RENAL)


@pytest.fixture(scope="module")
def mask_job(mask_bundle, source_masks, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    job = new_job(folder, mask_bundle, [""], None, 7, OPTIONS, batch_size=2, masks=conditioning_masks(source_masks))
    run = run_job(mask_bundle, job)
    assert (run.items, run.written) == (3, 3)
    return job


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_a_job_from_masks_keeps_image_mask_pairs(mask_job, mask_bundle, source_masks):
    folder = mask_job.folder
    assert sorted(_files(folder)) == [f"{d}/00000/0000{i}.png" for d in ("images", "masks") for i in range(3)]
    for i in range(3):
        stored = np.asarray(Image.open(folder / "masks" / "00000" / f"0000{i}.png"))
        np.testing.assert_array_equal(stored, np.asarray(Image.open(source_masks / f"layout-{i}.png")))
        assert Image.open(folder / "images" / "00000" / f"0000{i}.png").size == (64, 64)
    manifest = json.loads((folder / JOB_FILE).read_text())
    assert Job.read(folder).items[1] == {
        "index": 1, "file": "images/00000/00001.png", "mask": "masks/00000/00001.png",
        "mask_source": str(source_masks / "layout-1.png"), "caption": "", "seed": item_seed(7, 1), "steps": 2,
        "guidance": 1.5, "scheduler": "ddim", "model_id": mask_bundle.id, "height": 64, "width": 64,
        "mask_guidance": 2.0,
    }
    assert manifest["job"]["mask_guidance"] == 2.0
    assert [m["source"] for m in manifest["job"]["masks"]] == [str(source_masks / f"layout-{i}.png") for i in range(3)]
    # the images are those generate() makes from the masks
    masks = [np.asarray(Image.open(source_masks / f"layout-{i}.png")) for i in range(2)]
    direct = generate(mask_bundle, ["", ""], [item_seed(7, 0), item_seed(7, 1)], OPTIONS, masks=masks,
                      batch_size=2)
    np.testing.assert_array_equal(direct.images[1], np.asarray(Image.open(folder / "images/00000/00001.png")))


def test_a_jobs_masks_folder_is_read_as_masks_again_in_its_order(mask_job, source_masks):
    # generating again from a job's masks/ (numbered sub-folders), as for more seeds of the same masks
    again = conditioning_masks(mask_job.folder / "masks")
    assert [m.source for m in again] == [str(mask_job.folder / "masks" / "00000" / f"0000{i}.png") for i in range(3)]
    assert [m.digest for m in again] == [m.digest for m in conditioning_masks(source_masks)]


def test_a_job_from_masks_resumes_and_shards_to_the_same_bytes(mask_job, mask_bundle, source_masks, tmp_path):
    expected = _files(mask_job.folder)
    (mask_job.folder / "images" / "00000" / "00002.png").unlink()
    again = new_job(mask_job.folder, mask_bundle, [""], None, 7, OPTIONS, masks=conditioning_masks(source_masks))
    assert again.spec.batch_size == 2 and run_job(mask_bundle, again, check_files=True).written == 1
    assert _files(mask_job.folder) == expected
    sharded = tmp_path / "sharded"
    for index in (1, 0):
        job = new_job(sharded, mask_bundle, [""], None, 7, OPTIONS, batch_size=2,
                      masks=conditioning_masks(source_masks))
        run_job(mask_bundle, job, Shard(index, 2))
    assert _files(sharded) == expected


def test_a_job_refuses_other_or_changed_masks(mask_job, mask_bundle, source_masks, tmp_path):
    others = conditioning_masks(source_masks)[::-1]
    with pytest.raises(JobError, match=r"holds another job \(its job.json differs in masks\)"):
        new_job(mask_job.folder, mask_bundle, [""], None, 7, OPTIONS, masks=others)
    folder = tmp_path / "job"
    new_job(folder, mask_bundle, [""], None, 7, OPTIONS, masks=conditioning_masks(source_masks))
    write_png_atomic(folder / "masks" / "00000" / "00001.png", blob_mask(64, 64, 99))
    with pytest.raises(JobError, match=r"masks/00000/00001.png is not the mask the job was made with "
                                       r"\(.*layout-1.png\)"):
        run_job(mask_bundle, Job.read(folder))
    with pytest.raises(ConfigError, match=r"one image is made per mask: 3 masks, but 5 images were asked for"):
        new_job(tmp_path / "other", mask_bundle, [""], 5, 7, OPTIONS, masks=conditioning_masks(source_masks))


# --- the command ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mask_dataset(tmp_path_factory):
    writer = PatchDatasetWriter(tmp_path_factory.mktemp("dataset") / "ds", patch_size=64)
    rng = np.random.default_rng(0)
    for slide, split in (("a", "train"), ("b", "test")):
        patches = [Patch(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                         blob_mask(64, 64, 20 + i + 10 * (split == "test")))
                   for i in range(3)]
        writer.write_slide(slide, patches, split=split)
    return writer.finalize()


def test_generate_from_a_dataset_split(mask_bundle_path, mask_dataset, tmp_path):
    out = tmp_path / "job"
    args = ["generate", "--model", str(mask_bundle_path), "--masks-from", str(mask_dataset.root), "--split", "test",
            "--n", "2", "--seed", "4", "--steps", "1", "--mask-captions", "--out", str(out)]
    assert main(args) == 0
    items = Job.read(out).items
    test_rows = mask_dataset.rows("test")
    chosen = sorted(np.random.default_rng(4).choice(3, size=2, replace=False))
    assert [i["mask_source"] for i in items] == [
        f"{mask_dataset.root}:{test_rows.iloc[k]['patch_id']}" for k in chosen]
    assert [i["caption"] for i in items] == [test_rows.iloc[k]["caption"] for k in chosen]
    for item, k in zip(items, chosen, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(out / item["mask"])), mask_dataset.mask(test_rows.iloc[k]))
        assert (out / item["file"]).is_file()


@pytest.mark.parametrize("setup, message", [
    ("text-model", "is not mask-conditioned (it reads text only); generate from masks with a model trained with "
                   "--condition mask or text+mask"),
    ("odd-size", "is 64x66 px; a mask's sides must be multiples of 4 (the model's latent factor)"),
    ("unknown-id", "mask ids [12] are not in schema 'renal'"),
    ("mixed-sizes", "the masks have different sizes (64x64, 96x64 px); generate each size as its own job"),
    ("both-sources", "give either --mask or --masks-from, not both"),
])
def test_generate_from_masks_refuses_with_one_line(setup, message, mask_bundle_path, tiny_bundle_path,
                                                   mask_dataset, tmp_path, capsys):
    folder = tmp_path / "masks"
    write_png_atomic(folder / "a.png", blob_mask(64, 64, 0))
    model, extra = mask_bundle_path, []
    if setup == "text-model":
        model = tiny_bundle_path
    elif setup == "odd-size":
        write_png_atomic(folder / "a.png", blob_mask(66, 64, 0))
    elif setup == "unknown-id":
        write_png_atomic(folder / "b.png", np.full((64, 64), 12, np.uint8))
    elif setup == "mixed-sizes":
        write_png_atomic(folder / "b.png", blob_mask(64, 96, 0))
    elif setup == "both-sources":
        extra = ["--masks-from", str(mask_dataset.root)]
    code = main(["generate", "--model", str(model), "--mask", str(folder), "--out", str(tmp_path / "out"),
                 "--steps", "1", *extra])
    error = capsys.readouterr().err
    assert code == 2 and message in error, error
    assert not (tmp_path / "out" / "images").exists()
