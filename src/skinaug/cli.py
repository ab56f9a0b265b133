"""The `skinaug` command: one short command per pipeline stage (dvc.yaml runs them).

Paths come in as arguments (dvc.yaml names them); numbers come from params.yaml.
Every command reads the settings once, through config.load.

Over 300 lines only because there are 18 commands; each is a few lines that call a library
function (no path layout, no logic).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path

import click

from skinaug import SkinaugError, config, first_line

PathArg = click.Path(path_type=Path)
ExistingPath = click.Path(exists=True, path_type=Path)


_CLASSIFIER_OUT_OF_MEMORY = "set classify.batch_size lower (a change to the paper's recipe) or use a larger card"
# What to lower when a command runs out of GPU memory. Textual inversion at the paper's settings
# peaked at 25.4 GB on an H200 (benchmarks/README.md): more than a 24 GB card holds.
OUT_OF_MEMORY = {
    "textual_inversion": "set textual_inversion.tokens_per_pass to fewer tokens, e.g. 2 (0 sizes it from free "
                         "memory, an estimate): less memory, the same result; the run resumes from its last checkpoint",
    "lora": "set lora.batch_size lower (a change to the paper's recipe) or use a larger card; "
            "the run resumes from its last checkpoint",
    "generate": "set generate.batch_size to a fixed number below the automatic one (0 sizes it from free "
                "memory, up to 64): the same images up to rounding; those made so far are kept",
    "classify": _CLASSIFIER_OUT_OF_MEMORY,
    "reference": _CLASSIFIER_OUT_OF_MEMORY,
}


class _Group(click.Group):
    """Turn SkinaugError, and running out of GPU memory, into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SkinaugError as e:
            raise click.ClickException(str(e)) from None
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, named here without importing torch
            if type(e).__name__ != "OutOfMemoryError":
                raise
            name = ctx.invoked_subcommand
            what = ". ".join(first_line(e).split(". ")[:3])  # what it tried, and what the card had free
            fix = OUT_OF_MEMORY.get(name, "free the GPU (another process may hold memory) or lower the batch sizes")
            raise click.ClickException(f"{name} ran out of GPU memory ({what}): {fix}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", default="params.yaml", show_default=True, type=PathArg,
              help="Settings file (composed from conf/ by `dvc exp run`).")
@click.pass_context
def main(ctx: click.Context, params: Path) -> None:
    """Diffusion-based augmentation for under-represented skin types, stage by stage.

    Run the whole study with `dvc repro`; each command below is one stage.
    """
    ctx.obj = functools.partial(config.load, params)


def _cfg(ctx: click.Context) -> config.Config:
    return ctx.obj()


def _seed_option(f):
    return click.option("--seed", type=int, required=True, help="Split seed of this study repeat.")(f)


def _backbone_option(f):
    return click.option("--backbone", "backbone_dir", type=PathArg, default=None,
                        help="The backbone stage's folder (backbone.source: world; dvc.yaml names it).")(f)


def _live_option(f):
    return click.option("--live-dir", type=PathArg, default=None,
                        help="Write the training curve here as it trains (a DVCLive folder; dvc.yaml names it).")(f)


@main.command()
@click.argument("out_dir", type=PathArg)
@click.pass_context
def world(ctx, out_dir: Path) -> None:
    """Generate the embedded demo world (metadata.csv + images/) into OUT_DIR. Seconds."""
    from skinaug.demo import world as world_mod

    cfg = _cfg(ctx)
    df = world_mod.make_world(cfg.world, cfg.subset, out_dir)
    click.echo(f"world: {len(df)} images in {out_dir}")


@main.command()
@click.argument("metadata_csv", type=ExistingPath)
@click.argument("out_csv", type=PathArg)
@click.option("--table", type=PathArg, default=None, help="Also write the Table 1 counts (markdown) here.")
@click.pass_context
def subset(ctx, metadata_csv: Path, out_csv: Path, table: Path | None) -> None:
    """Keep the study's 7 labels x FST {1,2,5,6}, original columns and row order."""
    from skinaug import atomic
    from skinaug.data import fitzpatrick

    cfg = _cfg(ctx)
    meta = fitzpatrick.load_metadata(metadata_csv, cfg.data.metadata_md5)
    df = fitzpatrick.study_subset(meta, cfg.subset)
    atomic.write_csv(out_csv, df)
    if table is not None:
        atomic.write_text(table, fitzpatrick.table1(df))
    unknown = int(fitzpatrick.unknown_skin_type(meta).sum())
    click.echo(f"subset: {len(df)} of {len(meta)} rows -> {out_csv} "
               f"({unknown} of unknown skin type, fitzpatrick_scale {fitzpatrick.UNKNOWN_SCALE}, dropped)")


@main.command()
@click.argument("subset_csv", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--available", type=PathArg, required=True, help="CSV of the subset rows whose image was obtained.")
@click.option("--failures", type=PathArg, required=True, help="CSV report of images that could not be obtained.")
@click.pass_context
def images(ctx, subset_csv: Path, out_dir: Path, available: Path, failures: Path) -> None:
    """Fetch every subset image into OUT_DIR/{md5hash}.jpg (local folder or download; resumes)."""
    from skinaug.data import fitzpatrick

    cfg = _cfg(ctx)
    fitzpatrick.collect_images(subset_csv, out_dir, available, failures, cfg.data, cfg.download)


@main.command()
@click.argument("subset_csv", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--scenario", type=int, default=None, help="1, 2 or 3; default from params.")
@_seed_option
@click.option("--sampling", type=click.Choice(config.SAMPLINGS), default=None, help="Default from params.")
@click.option("--images", "images_dir", type=ExistingPath, default=None,
              help="Folder of {md5hash}.jpg; needed only with splits.dedupe (finds near-duplicates).")
@click.pass_context
def splits(ctx, subset_csv: Path, out_dir: Path, scenario: int | None, seed: int, sampling: str | None,
           images_dir: Path | None) -> None:
    """Write OUT_DIR/{train,test,flex_light,flex_dark}.csv for one scenario and seed."""
    from skinaug.data import splits as splits_mod

    cfg = _cfg(ctx)
    scenario = config.check_scenario(cfg.scenario if scenario is None else scenario)
    sizes = splits_mod.write_splits(subset_csv, out_dir, scenario, seed, cfg.splits, sampling, images_dir)
    click.echo("splits: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


@main.command()
@click.argument("out_dir", type=PathArg)
@click.pass_context
def base(ctx, out_dir: Path) -> None:
    """Materialise the base model as a local diffusers folder (hub download, local copy or the tiny demo model)."""
    from skinaug.diffusion import base

    cfg = _cfg(ctx)
    base.prepare_base(cfg.model, out_dir)


@main.command()
@click.argument("out_dir", type=PathArg)
@click.pass_context
def backbone(ctx, out_dir: Path) -> None:
    """Pretrain the classifiers' backbones (backbone.source: world) or note torchvision's ImageNet weights."""
    from skinaug.classify.backbone import trains
    from skinaug.demo import backbone as backbone_mod

    cfg = _cfg(ctx)
    start = time.monotonic()
    archs = backbone_mod.write(out_dir, cfg)
    how = "pretrained on the demo world's web corpus" if trains(cfg) else \
        f"nothing to train (classify.pretrained {cfg.classify.pretrained}, backbone.source {cfg.backbone.source})"
    click.echo(f"backbone: {', '.join(archs)}: {how} -> {out_dir}, {time.monotonic() - start:.0f} s")


@main.command("textual_inversion")
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("base_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@_seed_option
@_live_option
@click.pass_context
def textual_inversion(ctx, split_dir: Path, images_dir: Path, base_dir: Path, out_dir: Path, seed: int,
                      live_dir: Path | None) -> None:
    """Learn one token per label on that label's training images (all seven in one job)."""
    from skinaug import launch
    from skinaug.diffusion import finetune

    cfg = _cfg(ctx)
    if launch.relaunch_if_asked(cfg, sys.argv[1:]):  # launch.processes > 1: this command ran under accelerate
        return
    finetune.train_textual_inversion(split_dir / "train.csv", images_dir, base_dir, out_dir, cfg, seed,
                                     live_dir=live_dir)


@main.command()
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("base_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--ti-dir", type=ExistingPath, default=None, help="Learned tokens; omit for plain condition names.")
@_seed_option
@_live_option
@click.pass_context
def lora(ctx, split_dir: Path, images_dir: Path, base_dir: Path, out_dir: Path, ti_dir: Path | None, seed: int,
         live_dir: Path | None) -> None:
    """Fine-tune the UNet with LoRA on prompts naming the learned tokens and the skin type."""
    from skinaug import launch
    from skinaug.diffusion import finetune

    cfg = _cfg(ctx)
    if launch.relaunch_if_asked(cfg, sys.argv[1:]):  # launch.processes > 1: this command ran under accelerate
        return
    finetune.train_lora(split_dir / "train.csv", images_dir, base_dir, ti_dir, out_dir, cfg, seed, live_dir=live_dir)


@main.command()
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("base_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--ti-dir", type=ExistingPath, default=None, help="Learned tokens (strategies with ti).")
@click.option("--lora-dir", "lora_dirs", type=ExistingPath, multiple=True,
              help="LoRA folder (strategies with lora); repeat it to offer the token LoRA and the plain-name one: "
                   "the strategy takes the one trained as it needs.")
@click.option("--strategy", type=click.Choice(config.STRATEGIES), default=None,
              help="Generation strategy; default from params (generate.strategy).")
@click.option("--sources-per-label", type=int, default=0, show_default=True,
              help="Use only the first N training images of each label (0: all); the ablation's size.")
@_seed_option
@click.pass_context
def generate(ctx, split_dir: Path, images_dir: Path, base_dir: Path, out_dir: Path,
             ti_dir: Path | None, lora_dirs: tuple[Path, ...], strategy: str | None, sources_per_label: int,
             seed: int) -> None:
    """Synthesise dark-skin versions of every training image (img2img); resumes where it stopped."""
    from skinaug import launch
    from skinaug.diffusion import generate as generate_mod

    cfg = _cfg(ctx)
    if launch.relaunch_if_asked(cfg, sys.argv[1:]):  # launch.processes > 1: this command ran under accelerate
        return
    generate_mod.generate(split_dir / "train.csv", images_dir, base_dir, out_dir, cfg, seed,
                          ti_dir=ti_dir, lora_dir=list(lora_dirs), strategy=strategy or cfg.generate.strategy,
                          sources_per_label=sources_per_label)


@main.command()
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("out_json", type=PathArg)
@click.option("--syn-dir", type=ExistingPath, default=None, help="Synthetic images with manifest.csv (syn, real_syn).")
@click.option("--arch", type=click.Choice(config.ARCHS), required=True, help="Classifier architecture.")
@click.option("--train-type", required=True, type=click.Choice(config.TRAIN_TYPES))
@click.option("--test", "test_names", multiple=True, default=["test"], show_default=True,
              help="Split CSV(s) to test on (test, flex_light, flex_dark); with several, OUT_JSON holds {test}.")
@click.option("--keep", type=ExistingPath, default=None,
              help="The select stage's kept.csv: train only on the synthetic images it lists.")
@click.option("--epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Training epochs; 0: classify.epochs (the ablation passes ablation.epochs).")
@_seed_option
@_live_option
@_backbone_option
@click.pass_context
def classify(ctx, split_dir: Path, images_dir: Path, out_json: Path, syn_dir: Path | None,
             arch: str, train_type: str, test_names: tuple[str, ...], keep: Path | None, epochs: int, seed: int,
             live_dir: Path | None, backbone_dir: Path | None) -> None:
    """Train one classifier and write its metrics (JSON) on each test set."""
    from skinaug.classify import backbone
    from skinaug.classify import classifiers as classify_mod

    cfg = _cfg(ctx)
    if epochs:
        cfg = dataclasses.replace(cfg, classify=dataclasses.replace(cfg.classify, epochs=epochs))
    if len(test_names) > 1 and "{test}" not in str(out_json):
        raise click.UsageError("several --test sets need a {test} placeholder in OUT_JSON")
    outputs = {name: Path(str(out_json).replace("{test}", name)) for name in test_names}
    start = time.monotonic()
    weights = backbone.weights_file(cfg, backbone_dir, arch)
    for m in classify_mod.run(split_dir, images_dir, syn_dir, outputs, arch, train_type, cfg, seed, keep=keep,
                              live_dir=live_dir, weights=weights):
        click.echo(f"classify: {arch} {train_type} seed {seed} on {m['test_name']} ({m['n_test']} images): "
                   f"accuracy {m['accuracy_pct']:.2f}%, macro F1 {m['f1_pct']:.2f}%; "
                   f"epoch {m['chosen_epoch']}/{m['epochs']} by {m['selection']['rule']} "
                   f"({m['selection']['label']}); {m['n_train']['total']} training images, "
                   f"{time.monotonic() - start:.0f} s")


@main.command()
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("out_pt", type=PathArg)
@_seed_option
@_backbone_option
@click.pass_context
def reference(ctx, split_dir: Path, images_dir: Path, out_pt: Path, seed: int, backbone_dir: Path | None) -> None:
    """Train the reference classifier (quality.arch, real training images only) that quality and select use."""
    from skinaug.classify import backbone
    from skinaug.classify import classifiers as classify_mod

    cfg = _cfg(ctx)
    weights = backbone.weights_file(cfg, backbone_dir, cfg.quality.arch)
    info = classify_mod.train_reference(split_dir, images_dir, out_pt, cfg.quality.arch, cfg, seed, weights)
    click.echo(f"reference: {info['arch']} on {info['n_train']} real training images, epoch {info['chosen_epoch']} "
               f"({info['selection']}) -> {out_pt}")


@main.command()
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("syn_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--reference", "reference_pt", type=ExistingPath, required=True, help="The reference stage's classifier.")
@click.option("--metrics", "metrics_json", type=PathArg, required=True, help="Where the headline numbers go (JSON).")
@click.option("--title", default="", help="What is measured, for the markdown heading (default: SYN_DIR).")
@_seed_option
@_backbone_option
@click.pass_context
def quality(ctx, split_dir: Path, images_dir: Path, syn_dir: Path, out_dir: Path, reference_pt: Path,
            metrics_json: Path, title: str, seed: int, backbone_dir: Path | None) -> None:
    """Measure synthetic images against real ones of the requested skin type (FD, KID, precision/recall,
    density/coverage, lesion kept, tone moved): tables, figures and quality.md in OUT_DIR."""
    from skinaug.classify import backbone
    from skinaug.classify import quality as quality_mod

    cfg = _cfg(ctx)
    weights = backbone.weights_file(cfg, backbone_dir, cfg.quality.arch)
    head = quality_mod.run(split_dir, images_dir, syn_dir, reference_pt, out_dir, metrics_json, cfg, seed,
                           title or str(syn_dir), weights)
    click.echo(f"quality: {head['n_syn']} synthetic vs {head['n_ref']} reference images ({head['features']}): "
               + ", ".join(f"{k} {v}" for k, v in head.items() if k in quality_mod.HEADLINE) + f" -> {out_dir}")


@main.command()
@click.argument("syn_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--reference", "reference_pt", type=PathArg, required=True,
              help="The reference stage's classifier (read only by the lesion and best_n rules).")
@_backbone_option
@click.pass_context
def select(ctx, syn_dir: Path, out_dir: Path, reference_pt: Path, backbone_dir: Path | None) -> None:
    """Keep the synthetic images select.rules accept ([] keeps all): OUT_DIR/kept.csv and counts."""
    from skinaug.classify import backbone
    from skinaug.classify import select as select_mod

    cfg = _cfg(ctx)
    needs_reference = {"lesion", "best_n"} & set(cfg.select.rules)
    weights = backbone.weights_file(cfg, backbone_dir, cfg.quality.arch) if needs_reference else None
    summary = select_mod.run(syn_dir, reference_pt, out_dir, cfg, weights)
    click.echo(f"select [{', '.join(cfg.select.rules)}]: kept {int(summary.kept.sum())} of "
               f"{int(summary.generated.sum())} synthetic images -> {out_dir / 'kept.csv'}")


@main.command()
@click.argument("metrics_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--split-dir", type=ExistingPath, default=None, help="One seed's split, for the real-vs-synthetic figure.")
@click.option("--images-dir", type=ExistingPath, default=None, help="Real images ({md5hash}.jpg), for that figure.")
@click.option("--syn-dir", type=ExistingPath, default=None, help="That seed's synthetic images with manifest.csv.")
@click.option("--tone-dir", type=ExistingPath, default=None, help="`skinaug tone` output, for the skin-tone section.")
@click.option("--ablation-dir", type=ExistingPath, default=None, help="The ablation's metrics, if not under METRICS_DIR.")
@click.option("--quality-dir", type=ExistingPath, default=None,
              help="`skinaug quality` outputs of the scenario, for the quality section.")
@click.pass_context
def report(ctx, metrics_dir: Path, out_dir: Path, split_dir: Path | None, images_dir: Path | None,
           syn_dir: Path | None, tone_dir: Path | None, ablation_dir: Path | None, quality_dir: Path | None) -> None:
    """Aggregate metrics over seeds into the paper's tables and figures (OUT_DIR/results.md, figures/)."""
    from skinaug.report import results as report_mod

    cfg = _cfg(ctx)
    head = report_mod.build_report(metrics_dir, out_dir, cfg, split_dir=split_dir, images_dir=images_dir, syn_dir=syn_dir,
                                 tone_dir=tone_dir, ablation_dir=ablation_dir, quality_dir=quality_dir)
    cells = head.get("test_reference", head)
    click.echo(f"report: {out_dir / 'results.md'}; scenario {head['scenario']} ({head['selection']}): "
               + ", ".join(f"{a} {t} {v['accuracy_pct']:.2f}%" for a, d in cells.items() if isinstance(d, dict)
                           for t, v in d.items()))


@main.command()
@click.argument("out_dir", type=PathArg)
@click.option("--scenario", type=int, default=None, help="1, 2 or 3; default from params.")
@_seed_option
@click.option("--ti-dir", type=PathArg, default=None, help="Default models/scenario{S}/seed{seed}/ti (dvc.yaml).")
@click.option("--lora-dir", type=PathArg, default=None, help="Default models/scenario{S}/seed{seed}/lora.")
@click.option("--base-dir", type=PathArg, default=Path("models/base"), show_default=True)
@click.option("--split-dir", type=PathArg, default=None, help="Default data/splits/scenario{S}/seed{seed}.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.pass_context
def export(ctx, out_dir: Path, scenario: int | None, seed: int, ti_dir: Path | None, lora_dir: Path | None,
           base_dir: Path, split_dir: Path | None, force: bool) -> None:
    """Bundle one scenario and seed's tokens and LoRA with a model card, loadable by stock diffusers."""
    from skinaug import export as export_mod

    cfg = _cfg(ctx)
    scenario = config.check_scenario(cfg.scenario if scenario is None else scenario)
    run = Path(f"models/scenario{scenario}/seed{seed}")  # the layout dvc.yaml gives the adapter stages
    export_mod.export_bundle(
        out_dir, ti_dir=ti_dir or run / "ti", lora_dir=lora_dir or run / "lora", base_dir=base_dir,
        split_dir=split_dir or Path(f"data/splits/scenario{scenario}/seed{seed}"), scenario=scenario, seed=seed,
        generate=cfg.generate, resolution=cfg.model.resolution, data_source=cfg.data.source, force=force)


@main.command()
@click.argument("split_dir", type=ExistingPath)
@click.argument("images_dir", type=ExistingPath)
@click.argument("out_dir", type=PathArg)
@click.option("--syn-dir", type=ExistingPath, default=None, help="Synthetic images with manifest.csv.")
@click.pass_context
def tone(ctx, split_dir: Path, images_dir: Path, out_dir: Path, syn_dir: Path | None) -> None:
    """Skin tone (ITA) of real light, real dark and synthetic images: CSVs, summary and figure."""
    from skinaug import tone as tone_mod

    cfg = _cfg(ctx)
    summary = tone_mod.write_tone_report(split_dir, images_dir, syn_dir, out_dir, cfg.splits.light)
    click.echo(summary.to_string(index=False))


@main.command("sweep-report")
@click.argument("out_dir", type=PathArg)
@click.option("--param", default=None, help="The swept params.yaml key; default: the one of generate.strength, "
              "guidance, per_source, max_per_label that differs between the experiments.")
@click.option("--exp", "names", multiple=True, help="Only this finished experiment (repeat it); default: all of HEAD's.")
@click.option("--repo", "repo_dir", type=ExistingPath, default=Path("."), show_default=True,
              help="The git + DVC repository holding the experiments.")
def sweep_report(out_dir: Path, param: str | None, names: tuple[str, ...], repo_dir: Path) -> None:
    """Dark-skin accuracy and tone shift against a swept setting, from finished `dvc exp run` experiments.

    Writes OUT_DIR/sweep.md, sweep.csv and sweep.png. Queue a sweep first:
    dvc exp run --queue -S 'generate.strength=0.3,0.5,0.7' && dvc exp run --run-all
    """
    from skinaug.report import sweep

    exps = sweep.select(sweep.experiments(sweep.exp_show(repo_dir)), names)
    table = sweep.write_report(exps, out_dir, *sweep.git_reader(repo_dir), param=param)
    click.echo(f"sweep-report: {table.param.iloc[0]} over {table.value.nunique()} values, {len(exps)} experiments "
               f"-> {out_dir / 'sweep.md'}, sweep.csv, sweep.png")


@main.command()
@click.option("--tiny", is_flag=True, help="The tiny model at 16 px: the same code, seconds on a CPU (not GPU figures).")
@click.option("--out-dir", type=PathArg, default=Path("benchmarks/results"), show_default=True,
              help="Where the JSON goes ({date}_{device}.json).")
@click.option("--device", type=click.Choice(config.DEVICES), default="auto", show_default=True)
@click.option("--only", default="generation,ti,lora,classifiers", show_default=True,
              help="Comma-separated workloads; the study estimate needs all four.")
@click.option("--base", type=ExistingPath, default=None,
              help="Benchmark this diffusers folder instead of random weights (makes image differences meaningful).")
@click.pass_context
def bench(ctx, tiny: bool, out_dir: Path, device: str, only: str, base: Path | None) -> None:
    """Speed against the reference implementation and the card's limit (SD 2.1-base, random weights).

    Fixed reference settings: runs without params.yaml; with it, the paper profile's study sizes.
    """
    from skinaug.bench import speed as bench_mod

    params = Path(ctx.find_root().params["params"])
    cfg = _cfg(ctx) if params.exists() else None
    result = bench_mod.run(out_dir, tiny=tiny, device=device, only=tuple(w.strip() for w in only.split(",")),
                           cfg=cfg, base=base)
    click.echo(result["table"])
    click.echo(f"bench: {result['seconds']:.0f} s -> {result['path']}")


@main.command("gpu-check")
@click.argument("out_dir", type=PathArg)
@click.option("--tiny", is_flag=True, help="The tiny model: the same code, about a minute on a CPU (not GPU figures).")
def gpu_check(out_dir: Path, tiny: bool) -> None:
    """Every GPU stage once at paper settings (SD 2.1-base, random weights): time and peak memory per stage.

    Writes OUT_DIR/gpu_check.json; benchmarks/gpu_check.sh runs it and `skinaug bench` offline.
    """
    from skinaug.bench import gpucheck

    result = gpucheck.run(out_dir, tiny=tiny)
    click.echo(result["table"])
    click.echo(f"gpu-check: {result['seconds']:.0f} s -> {result['path']}")
    if not result["ok"]:
        failed = [name for name, stage in result["stages"].items() if not stage["ok"]]
        raise SkinaugError(f"gpu-check: {len(failed)} stage(s) failed ({', '.join(failed)}); see {result['path']}")
