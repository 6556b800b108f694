"""`vpit`: one entry point, a thin subcommand per stage.

Each subcommand is a plain function taking parsed arguments; `COMMANDS` maps names to
(function, parser builder) and a test keeps it in sync with the README. User mistakes
raise `UserError` (or an `IngestError`/`ValueError` from config validation) and are
printed as one line without a traceback (VPIT_DEBUG=1 shows it); only `main` exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from infra import grid_cli

__all__ = ["COMMANDS", "UserError", "main"]

# Third-party libraries that phone home at import; this tool is offline by design.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UserError(Exception):
    """A mistake in how vpit was called: printed plainly, exit code 2."""


def parse_sets(items: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` arguments -> {dotted key: value string}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="Ray tasks run at once (output does not depend on it)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (e.g. ray://head:10001 or auto); default: RAY_ADDRESS, else a local Ray")


def _build_ingest(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source_kind", required=True, metavar="KIND")
    llava = sub.add_parser(
        "llava", help="LLaVA/Cambrian-format JSON or JSONL -> understanding samples",
        description="Ingest LLaVA/Cambrian-format records (JSON list or JSONL with id, image, conversations) "
        "into WebDataset shards. Bad records go to quarantine.jsonl with a reason; a re-run resumes.",
    )
    llava.add_argument("input", help="JSON list or JSONL file")
    llava.add_argument("--image-root", required=True, help="folder that record image paths are relative to")
    llava.add_argument("--output", "-o", required=True, help="dataset folder to write (or resume)")
    llava.add_argument("--source", default="llava", help="source name, the prefix of sample ids (default: llava)")
    llava.add_argument("--shard-size", type=int, default=1000, help="input records per shard (default: 1000)")
    llava.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024,
                       help="quarantine images with more pixels (default: 64Mi)")
    _add_ray(llava)
    from infra.ingest_cli import add_parsers  # pairs, video, editing

    add_parsers(sub, _add_ray)


def cmd_ingest(args: argparse.Namespace) -> None:
    from infra import ingest_cli
    from pipelines.ingest import run_ingest
    from pipelines.llava import LlavaAdapter, LlavaConfig

    if args.source_kind in ingest_cli.KINDS:
        report = ingest_cli.run(args)
    else:
        adapter = LlavaAdapter(LlavaConfig(
            input=os.path.abspath(args.input), image_root=os.path.abspath(args.image_root), source=args.source,
            shard_size=args.shard_size, max_pixels=args.max_pixels,
        ))
        report = run_ingest(adapter, args.output, workers=args.workers, ray_address=args.ray_address)
    if report.shards_written == 0:
        print(f"nothing to do: all {report.shards_total} shards of {report.output} are already complete")
    print(report.summary())


def _build_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset folder (holds manifest.json)")
    p.add_argument("-n", type=int, default=3, help="number of samples to render (default: 3)")
    p.add_argument("--quarantine", type=int, default=5, help="quarantine lines to show (default: 5)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from pipelines.inspect import describe_dataset

    print(describe_dataset(args.path, n=args.n, quarantine=args.quarantine))


def _build_demo(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the whole pipeline on generated shapes-world data, in nine stages: generate raw data of all four "
        "kinds, ingest, precompute visual tokens, plan a mixture, train a tiny VPiT model, evaluate it on the "
        "held-out split, run a 2x2 mixture grid on Ray, train the diffusion decoder, and generate images from "
        "unseen prompts. About 4 minutes on a 2-core CPU (--quick: about 2). Writes OUTPUT/report.html (and "
        "report.md) with the ingest counts, the mixture plan, loss curves, metrics, grid heatmaps and a gallery."
    )
    p.add_argument("--output", "-o", default="demo-out", help="folder for everything the demo writes (default: demo-out)")
    p.add_argument("--quick", action="store_true", help="a shortened demo: less data, fewer steps, the same stages")
    p.add_argument("--samples", type=int, default=None, help="shapes-world LLaVA records to generate (default: 400)")
    p.add_argument("--train-steps", type=int, default=None, help="VPiT training steps (default: 250)")
    p.add_argument("--decoder-steps", type=int, default=None, help="diffusion decoder steps (default: 400)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers for ingest (default: 2)")


def cmd_demo(args: argparse.Namespace) -> None:
    from infra.demo import DemoConfig, run_demo

    given = {k: v for k, v in (("samples", args.samples), ("train_steps", args.train_steps),
                               ("decoder_steps", args.decoder_steps), ("workers", args.workers)) if v is not None}
    run_demo(args.output, DemoConfig.quick(**given) if args.quick else DemoConfig(**given))


def _build_precompute(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Encode every image of DATASET once with a frozen vision encoder and store its visual tokens in "
        "DATASET/tokens/<fingerprint>/ (one memory-mappable .npy per shard, aligned with the shard index). "
        "The fingerprint hashes every setting that changes the numbers, so caches of several encoders live "
        "side by side. Runs as a Ray Data job with one encoder per actor (one actor per GPU on a GPU cluster); "
        "a re-run skips complete shards and redoes partial or stale ones."
    )
    p.add_argument("dataset", help="dataset folder (holds manifest.json)")
    p.add_argument("--encoder", required=True,
                   help="`tiny` (random tiny SigLIP, for tests and the demo), a local SigLIP/CLIP model folder, "
                   "or a model id in the local Hugging Face cache (e.g. google/siglip-so400m-patch14-384)")
    p.add_argument("--revision", default=None, help="hub revision when --encoder is a model id")
    p.add_argument("--tokens", type=int, default=64, help="visual tokens per image, a perfect square (default: 64 = 8x8)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="cache dtype (default: fp16)")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state index to pool (default: -1, the last layer)")
    p.add_argument("--pooling", choices=("bilinear", "avg"), default="bilinear",
                   help="patch grid -> s x s: bilinear resize, align_corners=False (default), or average pooling")
    p.add_argument("--normalize", choices=("l2", "none"), default="l2", help="per-token normalisation (default: l2)")
    p.add_argument("--compute-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the encoder forward (default: fp32; bf16 is faster on GPUs)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward (default: 32)")
    p.add_argument("--actors", type=int, default=None, help="encoder actors (default: one per GPU, else 1)")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) per actor (default: 1)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (e.g. ray://head:10001 or auto); default: RAY_ADDRESS, else a local Ray")


def cmd_precompute(args: argparse.Namespace) -> None:
    from model.encoder import EncoderConfig
    from pipelines.precompute import PrecomputeConfig, run_precompute
    from pipelines.token_cache import CacheError

    enc = EncoderConfig(encoder=args.encoder, revision=args.revision, layer=args.layer, pooling=args.pooling,
                        tokens=args.tokens, normalize=args.normalize, dtype=args.dtype, compute_dtype=args.compute_dtype)
    job = PrecomputeConfig(batch_size=args.batch_size, actors=args.actors, actor_cpus=args.actor_cpus)
    try:
        report = run_precompute(args.dataset, enc, job, ray_address=args.ray_address)
    except CacheError as e:
        raise UserError(str(e)) from None
    if report.shards_written == 0:
        print(f"nothing to do: all {report.shards_total} shards of {report.dataset} are already cached")
    print(report.summary())


def _build_train(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a VPiT model (an LLM + input projector + vision head) with DeepSpeed ZeRO-3 on the mixture a "
        "training YAML names (see README, 'Train'). Run directly for one process, or launch several with "
        "`torchrun --nproc_per_node N -m infra.cli train CONFIG` or `deepspeed --module infra.cli train CONFIG`. "
        "bf16 on GPU, fp32 on CPU (gloo). Writes checkpoints, metrics.jsonl and loss.png under output_dir."
    )
    p.add_argument("config", help="training YAML (model, data, batch sizes, steps, lr, ...)")
    p.add_argument("--resume", action="store_true",
                   help="continue output_dir from its latest complete checkpoint (same samples, same losses)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted, value parsed as YAML (e.g. --set data.max_len=512)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def cmd_train(args: argparse.Namespace) -> None:
    import yaml

    from train.config import load_train_config
    from train.trainer import Trainer

    overrides = {k: yaml.safe_load(v) for k, v in parse_sets(args.set).items()}
    summary = Trainer(load_train_config(args.config, overrides)).train(resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = summary["first"] or {}, summary["last"] or {}
        print(f"trained {summary['steps']} steps (global batch {summary['global_batch']}, lr {summary['lr']:.3g}): "
              f"text loss {first.get('text_loss', float('nan')):.3f} -> {last.get('text_loss', float('nan')):.3f}, "
              f"vision loss {first.get('vision_loss', float('nan')):.3f} -> {last.get('vision_loss', float('nan')):.3f}"
              f"\nloss curve: {summary['loss_png']}")


def _build_export(p: argparse.ArgumentParser) -> None:
    p.description = ("Merge a ZeRO-3 checkpoint into a Hugging Face folder: the LLM as safetensors (loads with "
                     "AutoModelForCausalLM.from_pretrained), the tokenizer, and projector/vision head beside it.")
    p.add_argument("checkpoint", help="a run folder (its latest complete checkpoint) or a checkpoint folder")
    p.add_argument("--output", "-o", required=True, help="folder to write")


def cmd_export(args: argparse.Namespace) -> None:
    from train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output)
    print(f"exported to {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))


def _build_generate(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate text, and visual tokens wherever the model emits <image_start> (m tokens, each "
                     "fed back through the input projector, with a KV cache). Tokens are saved as .npy.")
    p.add_argument("checkpoint", help="an exported folder, a run folder or a checkpoint folder")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    p.add_argument("--image", action="store_true", help="start the answer with an image (force <image_start>)")
    p.add_argument("--output", "-o", default="generated", help="folder for the .npy files (default: generated)")


def cmd_generate(args: argparse.Namespace) -> None:
    from model.chat_template import get_template, stop_ids
    from model.generate import encode_prompt, generate, render_generation, save_images
    from train.export import load_any

    model, tok = load_any(args.checkpoint)
    ids, vis = encode_prompt(model, tok, [{"role": "user", "content": [{"text": args.prompt}]}])
    stops = stop_ids(tok, get_template(model.config.chat_template))
    gen = generate(model, ids, vis, max_new_tokens=args.max_new_tokens, stop_ids=stops, force_image=args.image)
    paths = save_images(gen, args.output)
    print(render_generation(gen, tok, paths))


def _build_mix(p: argparse.ArgumentParser) -> None:
    p.description = ("Mixture specs (YAML: sources, per-group counts or weights, split, seed, repetition, token "
                     "cache; see README 'Mixtures'). `plan` validates the spec against its datasets and prints "
                     "exact per-source counts, writing nothing; `inspect` reads the first batches through the "
                     "deterministic stream and plots the cumulative group ratio.")
    sub = p.add_subparsers(dest="mix_command", required=True, metavar="ACTION")
    plan = sub.add_parser("plan", help="validate a spec and print its plan table (writes nothing)",
                          description="Validate SPEC, resolve its datasets and print per-source available/planned "
                          "counts, repetition, estimated text and visual tokens, group ratios and the plan hash. "
                          "An infeasible spec fails here with what to change.")
    inspect = sub.add_parser("inspect", help="realised composition of the first N global batches + ratio PNG",
                             description="Read the first N global batches through the mixture stream, print each "
                             "group's count per batch against the plan, and write a PNG of the cumulative group "
                             "ratio over the run (and optionally the sample ids of every step).")
    for q in (plan, inspect):
        q.add_argument("spec", help="mixture spec YAML")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, dotted, value parsed as YAML (e.g. --set groups.generation.count=200k)")
    inspect.add_argument("--steps", type=int, default=20, help="global batches to read (default: 20)")
    inspect.add_argument("--batch-size", type=int, required=True, help="global batch size (all ranks, one step)")
    inspect.add_argument("--png", default=None, help="plot to write (default: SPEC's name + .ratio.png beside it)")
    inspect.add_argument("--lineage", default=None, metavar="JSONL",
                         help="also write the sample ids of each inspected step, one JSON line per step")


def cmd_mix(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mixtures import load_spec, make_plan

    overrides = parse_sets(args.set)  # load_spec reads string values as YAML
    plan = make_plan(load_spec(args.spec, overrides or None))
    if args.mix_command == "plan":
        print(plan.table())
        return
    from mixtures.inspect import inspect_mixture

    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be >= 1")
    spec = Path(args.spec)
    png = Path(args.png) if args.png else spec.with_name(spec.stem + ".ratio.png")
    print(inspect_mixture(plan, batch_size=args.batch_size, steps=args.steps, png=png,
                          lineage=Path(args.lineage) if args.lineage else None))


def _build_decoder(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The diffusion decoder: visual tokens -> pixels (MetaMorph's SigLIP-conditioned Stable Diffusion). "
        "`train` fits it on a dataset's images and their cached tokens; `sample` decodes a .npy of tokens to PNGs."
    )
    sub = p.add_subparsers(dest="decoder_command", required=True, metavar="ACTION")
    t = sub.add_parser(
        "train", help="train the decoder on DATASET's images and token cache",
        description="Train the diffusion decoder (a projector into cross-attention + a diffusers UNet or DiT; DDPM "
        "training, classifier-free guidance by dropping the conditioning) on every image of DATASET and its "
        "tokens in the cache --cache. One process here; for several GPUs launch it with "
        "`deepspeed --module infra.cli decoder train ...` (ZeRO-3, bf16). Writes the decoder, losses.jsonl, "
        "loss.png, and held-out samples scored against their true images (heldout.png, heldout.json).",
    )
    t.add_argument("dataset", help="dataset folder (holds manifest.json and tokens/)")
    t.add_argument("--cache", default=None,
                   help="token cache fingerprint (default: the dataset's only complete cache)")
    t.add_argument("--output", "-o", required=True, help="folder for the trained decoder and its logs")
    t.add_argument("--config", default=None,
                   help="decoder training YAML (keys of DecoderTrainConfig; `decoder:` holds the architecture)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's, 600)")
    t.add_argument("--deepspeed", default=None, help="DeepSpeed JSON: train through DeepSpeed even in one process")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted, value parsed as YAML (e.g. --set decoder.backbone=unet)")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    s = sub.add_parser("sample", help="decode visual tokens (.npy) to PNG images",
                       description="Decode TOKENS.npy ((m, d) or (n, m, d), e.g. from `vpit generate`) with a trained "
                       "decoder: DDIM with classifier-free guidance. One image goes to OUT; n go to OUT-0.png, ...")
    s.add_argument("tokens", help=".npy of visual tokens, (m, d) or (n, m, d)")
    s.add_argument("--decoder", required=True, help="folder written by `vpit decoder train`")
    s.add_argument("--output", "-o", required=True, help="PNG path")
    s.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25)")
    s.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (default: 2.0)")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: 0)")


def cmd_decoder(args: argparse.Namespace) -> None:
    from pathlib import Path

    import numpy as np
    import yaml

    if args.decoder_command == "sample":
        from model.decoder import decode_tokens

        path = Path(args.tokens)
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        tokens = np.load(path, allow_pickle=False)
        if tokens.ndim not in (2, 3):
            raise UserError(f"{path}: expected tokens of shape (m, d) or (n, m, d), got {tokens.shape}")
        images = decode_tokens(args.decoder, tokens, steps=args.steps, guidance=args.guidance, seed=args.seed)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
                                                for i in range(len(images))]
        for img, p in zip(images, paths):
            img.save(p)
        print(f"decoded {len(images)} image(s) of {images[0].size[0]}x{images[0].size[1]}: {', '.join(map(str, paths))}")
        return
    from pipelines.token_cache import CacheError, available_fingerprints
    from train.decoder_data import CachePairs
    from train.decoder_train import format_summary, load_decoder_train_config, train_decoder

    overrides = {k: yaml.safe_load(v) for k, v in parse_sets(args.set).items()}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.deepspeed is not None:
        overrides["deepspeed"] = os.path.abspath(args.deepspeed)
    cfg = load_decoder_train_config(args.config, output=os.path.abspath(args.output), overrides=overrides)
    fingerprint = args.cache
    if fingerprint is None:
        have = available_fingerprints(args.dataset)
        if len(have) != 1:
            raise UserError(f"{args.dataset} has {len(have)} complete token caches ({', '.join(have) or 'none'}); "
                            "name one with --cache" + ("" if have else ", after `vpit precompute`"))
        fingerprint = have[0]
    try:
        pairs = CachePairs(args.dataset, fingerprint, cfg.decoder.image_size)
    except CacheError as e:
        raise UserError(str(e)) from None
    summary = train_decoder(cfg, pairs)
    if summary:  # rank 0
        print(format_summary(summary))


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "ingest": (cmd_ingest, _build_ingest, "raw source -> instruction shards (Ray Data job)"),
    "precompute": (cmd_precompute, _build_precompute, "images -> cached frozen-encoder visual tokens (Ray Data job)"),
    "inspect": (cmd_inspect, _build_inspect, "print a dataset's manifest summary and render samples"),
    "mix": (cmd_mix, _build_mix, "plan and inspect mixture specs (exact counts, per-batch ratios)"),
    "demo": (cmd_demo, _build_demo, "run the whole pipeline on generated shapes-world data"),
    "train": (cmd_train, _build_train, "train a VPiT model on a mixture with DeepSpeed ZeRO-3"),
    "export": (cmd_export, _build_export, "training checkpoint -> Hugging Face folder (safetensors)"),
    "generate": (cmd_generate, _build_generate, "generate text and visual tokens (.npy) from a trained model"),
    "decoder": (cmd_decoder, _build_decoder, "diffusion decoder: train on a token cache, decode tokens to PNGs"),
    "eval": (grid_cli.cmd_eval, grid_cli.build_eval, "evaluate a run on its mixture's held-out split"),
    "grid": (grid_cli.cmd_grid, grid_cli.build_grid, "mixture ablation grids: plan, run on Ray, report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vpit",
        description="vpit: the data side of Visual-Predictive Instruction Tuning (MetaMorph). "
        "Ingest sources into instruction shards, precompute visual tokens, mix, train, run grids.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, build, help_text) in COMMANDS.items():
        build(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.ingest import IngestError

    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][0](args)
    except (UserError, IngestError, ValueError, FileNotFoundError) as e:
        if os.environ.get("VPIT_DEBUG"):
            raise
        print(f"vpit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpit {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
