"""A model folder's card (its ``README.md``), written from its ``histosynth.json``.

:func:`model_card` says what the model is (conditioning, image size, schema), how to sample it (the
``histosynth generate`` command and the diffusers form), what it was trained on and for how many
steps, the metrics its provenance records beside the commands that produced them, and its intended
use and limits. A model trained on the procedural renal phantom (``histosynth phantom``) says so:
it has never seen tissue. Everything comes from the description, so the card is rewritten whenever
``histosynth.json`` is (:func:`histosynth.models.bundle.write_model_config`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from .bundle import ModelConfig

#: what each training metric of a provenance record is, and which command measured it
_TRAINING_METRICS = {
    "final_loss": "training loss (MSE of the {target}) at the last step",
    "loss_first_10_logs": "mean of the first 10 logged training losses",
    "loss_last_10_logs": "mean of the last 10 logged training losses",
    "logged_steps": "last step in the training log",
    "sample_seconds_256px": "seconds to sample one 256 px image",
}
_AUTOENCODER_METRICS = {
    "psnr_db": "reconstruction PSNR (dB) on the autoencoder's held-out patches",
    "ssim": "reconstruction SSIM on the autoencoder's held-out patches",
    "two_sample_auc": "two-sample AUC of the reconstructions against the autoencoder's held-out patches",
}
PHANTOM_LIMIT = ("Trained on a procedural phantom, not on tissue: the images imitate the phantom's "
                 "H&E-like drawing of renal structures (`histosynth phantom`), not real kidney biopsies.")


def model_card(config: "ModelConfig") -> str:
    """The model card (Markdown) of a model folder described by ``config``."""
    provenance = config.provenance or {}
    sections = [
        _summary(config),
        _usage(config),
        _training(provenance),
        _metrics(provenance, _loss_target(config.preset or {})),
        _use_and_limits(config, provenance),
    ]
    return "\n\n".join(s for s in sections if s).rstrip() + "\n"


def trained_on_phantom(provenance: Mapping[str, Any]) -> bool:
    """Whether the provenance's training data were phantom patches (by its dataset names)."""
    data = provenance.get("data") or {}
    if not isinstance(data, Mapping):
        return "phantom" in str(data).lower()
    names = [data.get("dataset"), data.get("source"), *(data.get("merged_from") or [])]
    return any("phantom" in str(name).lower() for name in names if name)


# --- sections ----------------------------------------------------------------------------------------------
def _summary(config: "ModelConfig") -> str:
    conditioning = config.conditioning
    reads = "text" if not conditioning.mask_channels else (
        "text and label masks" if conditioning.text else "label masks")
    classes = ", ".join(c["name"] for c in config.class_schema.get("classes", []))
    preset = (config.preset or {}).get("name", "a custom preset")
    return "\n".join([
        f"# histosynth model `{config.id}`",
        "",
        f"A latent diffusion model for renal histopathology patches of {config.image_size} px that reads {reads} "
        f"(preset `{preset}`, {config.unet_weights.upper()} weights, text encoder `{config.text_encoder.ref}`). "
        f"Class schema `{config.class_schema.get('name', '?')}`: {classes}." + _recipe(config.preset or {}),
        "",
        f"Sampling defaults: {_sampler(config)} with {config.sampling.steps} steps, guidance "
        f"{config.sampling.guidance:g}" + (f", mask guidance {config.sampling.mask_guidance:g}"
                                          if conditioning.mask_channels else "")
        + ("; each step's clean-latent prediction is clamped into the training latents' range"
           if config.latent.range is not None else "") + ".",
    ])


def _sampler(config: "ModelConfig") -> str:
    """The default sampler by name; a flow model's are DPM-Solver++ steps on its flow (ddim: the first order)."""
    flow = (config.preset or {}).get("diffusion", {}).get("prediction_type") == "flow_prediction"
    if not flow:
        return config.sampling.scheduler
    return {"ddim": "ddim (on a flow: its Euler step)", "dpm++": "dpm++ (on the flow's levels)"}.get(
        config.sampling.scheduler, config.sampling.scheduler)


def _recipe(preset: Mapping[str, Any]) -> str:
    """The training recipe's options where they differ from CompVis' (noise prediction, unweighted MSE)."""
    prediction = preset.get("diffusion", {}).get("prediction_type", "epsilon")
    gamma = preset.get("training", {}).get("min_snr_gamma")
    rare = preset.get("training", {}).get("repeat_rare")
    sampling = (f" Patches holding a class that fewer than {rare:g} of the patches hold were repeated "
                "(repeat-factor sampling)." if rare else "")
    denoiser = _denoiser(preset)
    if prediction == "epsilon" and not gamma:
        return denoiser + sampling
    targets = {"v_prediction": "the velocity (v-prediction)",
               "flow_prediction": "the velocity eps - x0 of a straight flow (flow matching)"}
    target = targets.get(prediction, "the noise")
    weights = f", with min-SNR-{gamma:g} loss weights" if gamma else ""
    return f"{denoiser} Trained to predict {target}{weights}.{sampling}"


def _loss_target(preset: Mapping[str, Any]) -> str:
    """What the training loss compares, by the preset's objective and loss weights."""
    diffusion = preset.get("diffusion", {})
    target = {"v_prediction": "velocity prediction", "flow_prediction": "flow velocity prediction"}.get(
        diffusion.get("prediction_type", "epsilon"), "noise prediction")
    return f"min-SNR weighted {target}" if preset.get("training", {}).get("min_snr_gamma") else target


def _denoiser(preset: Mapping[str, Any]) -> str:
    """The transformer denoiser's size, where the model has one (a UNet is the default and not named)."""
    if preset.get("denoiser", "unet") != "dit":
        return ""
    dit = preset.get("dit", {})
    return (f" The denoiser is a transformer (DiT in PixArt-alpha's layout: {dit.get('depth')} blocks of width "
            f"{dit.get('width')}, {dit.get('patch_size')}x{dit.get('patch_size')}-latent-pixel tokens).")


def _usage(config: "ModelConfig") -> str:
    return "\n".join([
        "## Usage",
        "",
        "```bash",
        "histosynth generate --model THIS_FOLDER --levels 'Glomeruli=high,Tubuli=medium' --n 4 --seed 0 --out images/",
        "```",
        "",
        "```python",
        "from histosynth.pipeline import HistosynthPipeline",
        "",
        'pipe = HistosynthPipeline.from_pretrained("THIS_FOLDER")',
        'caption = "There is a lot of Glomeruli visible in the image."',
        f"images = pipe(caption, num_inference_steps={config.sampling.steps}, "
        f"guidance_scale={config.sampling.guidance:g}, seed=0).images",
        "```",
        "",
        "The pipeline's images are those of `histosynth generate` with the same caption, seed and options.",
        *(["", "From label masks (PNGs of schema class ids): `histosynth generate --model THIS_FOLDER --mask MASKS "
            "--seed 0 --out images/`; the pipeline takes no masks and samples as `generate` does without `--mask`."]
          if config.conditioning.mask_channels else []),
    ])


def _training(provenance: Mapping[str, Any]) -> str:
    if not provenance:
        return "## Training\n\nThis model's description records no provenance."
    data = provenance.get("data") or {}
    lines = ["## Training", ""]
    if data:
        lines.append(f"- data: {_data(data)}")
    if provenance.get("steps") is not None:
        lines.append(f"- training steps: {provenance['steps']}"
                     + (f", batch size {provenance['batch_size']}" if provenance.get("batch_size") else "")
                     + (f", learning rate {provenance['lr']:g}" if isinstance(provenance.get("lr"), (int, float))
                        else "")
                     + (f", precision {provenance['precision']}" if provenance.get("precision") else "")
                     + (f", seed {provenance['seed']}" if provenance.get("seed") is not None else ""))
    if provenance.get("init"):
        lines.append(f"- initialised from `{provenance['init']}`" + _init_model(provenance.get("init_model")))
    if provenance.get("condition"):
        lines.append(f"- conditioning: {provenance['condition']}")
    times = [f"{label} {_duration(provenance[key])}" for key, label in
             (("training_time_s", "training"), ("wall_time_s", "wall time in all")) if provenance.get(key)]
    if times:
        lines.append(f"- time: {', '.join(times)}")
    if provenance.get("hardware"):
        lines.append(f"- hardware: {_hardware(provenance['hardware'])}")
    lines += _commands("Commands", provenance.get("command"))
    autoencoder = provenance.get("autoencoder")
    if isinstance(autoencoder, Mapping):
        lines += ["", f"The autoencoder: {_how_trained(autoencoder)}."]
        lines += _commands("Its commands", autoencoder.get("command"))
    decoder = provenance.get("decoder")
    if isinstance(decoder, Mapping):
        lines += ["", "The decoder was replaced by one fine-tuned alone on the same latents (decoder "
                  f"{decoder.get('digest', '?')}): {_how_trained(decoder)}."]
        lines += _commands("Its commands", decoder.get("command"))
    if provenance.get("weights_dtype") == "bfloat16":
        lines += ["", "The weights are stored in bfloat16 (`histosynth convert-weights`) and load as float32: the "
                  "images differ slightly from those of the float32 weights it was trained to."]
    return "\n".join(lines)


def _init_model(record: Any) -> str:
    """The model a fine-tune started from, as its provenance records it (a path alone names a folder of the
    machine it was trained on)."""
    if not isinstance(record, Mapping):
        return ""
    details = [f"model `{record['id']}`" if record.get("id") else None,
               f"{record['steps']} steps" if record.get("steps") else None,
               {"epsilon": "noise prediction", "flow_prediction": "flow matching", "v_prediction": "v-prediction"}.get(
                   record.get("prediction_type"), record.get("prediction_type"))]
    return f" ({', '.join(filter(None, details))})" if any(details) else ""


def _how_trained(record: Mapping[str, Any]) -> str:
    """Steps, data and time of the autoencoder's (or a replaced decoder's) training record: its training time
    summed over the commands of a resumed run where recorded, else its wall time."""
    seconds = record.get("training_time_s") or record.get("wall_time_s")
    details = [f"{record['steps']} steps" if record.get("steps") else None,
               f"on {_data(record.get('data') or {'dataset': record.get('dataset', '?')})}",
               _duration(seconds) if seconds else None]
    return ", ".join(filter(None, details))


def _metrics(provenance: Mapping[str, Any], loss_target: str) -> str:
    rows = []
    metrics = provenance.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    training = "the training commands above (training log)"
    for key, value in metrics.items():
        if key == "sample_timing" or isinstance(value, (Mapping, list)):
            continue
        what = _TRAINING_METRICS.get(key, key).format(target=loss_target)
        how = metrics.get("sample_timing", "sampling after training") if key.startswith("sample_") else training
        rows.append((what, value, how))
    for part, training_command in (("autoencoder", "the autoencoder's training command"),
                                   ("decoder", "the decoder's fine-tune")):
        if isinstance(provenance.get(part), Mapping):
            rows += _reconstruction_rows(provenance[part], part, training_command)
    if not rows:
        return "## Metrics\n\nNone recorded."
    table = ["## Metrics", "", "| metric | value | measured by |", "|---|---|---|"]
    table += [f"| {what} | {_number(value)} | {how} |" for what, value, how in rows]
    return "\n".join(table)


def _reconstruction_rows(record: Mapping[str, Any], part: str, training_command: str) -> list[tuple]:
    """The reconstruction metrics of the autoencoder's (or a replaced decoder's) record: those its training
    command measured and those of its ``held_out`` evaluation per source."""
    label = "" if part == "autoencoder" else f" ({part})"
    measured = f"{training_command} (held-out split" + (
        f", {record['held_out_patches']} patches)" if record.get("held_out_patches") else ")")
    rows = [(what + label, record[key], measured) for key, what in _AUTOENCODER_METRICS.items()
            if record.get(key) is not None]
    held_out = record.get("held_out")
    for source, scores in (held_out.items() if isinstance(held_out, Mapping) else ()):
        if isinstance(scores, Mapping):
            how = f"reconstructions of {scores.get('patches', '?')} held-out `{source}` patches after training"
            rows += [(f"{what} ({source}){label}", scores[key], how)
                     for key, what in (("psnr_db", "PSNR (dB)"), ("ssim", "SSIM"),
                                       ("two_sample_auc", "two-sample AUC")) if key in scores]
    return rows


def _use_and_limits(config: "ModelConfig", provenance: Mapping[str, Any]) -> str:
    limits = []
    if trained_on_phantom(provenance):
        limits.append(PHANTOM_LIMIT)
    steps = provenance.get("steps")
    if isinstance(steps, int) and steps < 100_000:
        limits.append(f"A short training run ({steps} steps): expect coarse textures and classes drawn less "
                      "often than the caption asks, rare classes most of all.")
    limits.append("Images come from the patches and captions the model was trained on; captions outside the "
                  f"schema `{config.class_schema.get('name', '?')}`'s templates are refused.")
    limits.append("Not for diagnosis, and not a stand-in for real data in any clinical decision.")
    return "\n".join([
        "## Intended use",
        "",
        "Research on synthetic histopathology: generating image (and, from masks, image-mask) pairs to study "
        "caption and mask conditioning, to test segmentation and evaluation pipelines, and to compare "
        "against real-data training.",
        "",
        "## Limits",
        "",
        *[f"- {limit}" for limit in limits],
    ])


# --- formatting ------------------------------------------------------------------------------------------
def _data(data: Mapping[str, Any]) -> str:
    """A dataset of a provenance record in words: name, patches, splits, sources, who made it."""
    if not isinstance(data, Mapping):
        return f"`{data}`"
    splits = data.get("splits")
    sources = data.get("merged_from")
    return (f"`{data.get('dataset', '?')}`"
            + (f", {data['patches']} patches" if data.get("patches") else "")
            + (f" of {data['patch_size']} px" if data.get("patch_size") else "")
            + (f" (splits: {_pairs(splits)})" if isinstance(splits, Mapping) else "")
            + (f", merged from {', '.join(f'`{d}`' for d in sources)}" if sources else "")
            + (f"; made by {data['made_by']}" if data.get("made_by") else ""))


def _commands(title: str, commands: Any) -> list[str]:
    if not commands:
        return []
    commands = [commands] if isinstance(commands, str) else list(commands)
    return ["", f"{title}:", "", "```bash", *map(str, commands), "```"]


def _pairs(mapping: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items())


def _duration(seconds: Any) -> str:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _hardware(hardware: Any) -> str:
    if not isinstance(hardware, Mapping):
        return str(hardware)
    parts: Iterable[str] = (f"{k} {v}" for k, v in hardware.items() if k != "platform")
    return ", ".join(parts)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if not isinstance(value, (int, str)) else str(value)
