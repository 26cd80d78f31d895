"""Distil a wider teacher into one task adapter: does ``convlora.distill`` help a rank-1 adapter?

    python examples/restoration/distill.py    # noise50 on runs/restoration_cpu_subset/base.safetensors
    python examples/restoration/distill.py --teacher runs/restoration_distill/teacher.safetensors --p 1

(1) Train a wider ResidualCNN (64 channels) on ``--task`` from scratch (or load ``--teacher``).
(2) Per arm, train a fresh adapter on the frozen base, on train.py's seeded stream for the task,
with a :class:`convlora.distill.Distiller` loss (:func:`arm_weights`): ``l1`` (train.py's recipe),
``out`` (+ L1 to the teacher), ``out_aff`` (+ affinity of tapped features), ``rec_aff`` (L1 +
affinity). ``--w-aff auto`` gives the affinity gradient the L1 gradient's norm on the first batch.
(3) Score input, base, teacher and arms; write ``teacher.safetensors``, ``adapters/<arm>``,
``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.restoration` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import Tensor, nn

import convlora
from convlora.distill import Distiller, FeatureTaps
from examples.restoration import data, train
from examples.restoration.config import apply_options, load_config, resolve_path
from examples.restoration.degrade import Task, get_task
from examples.restoration.evaluate import Case, degraded_cases, eval_kernels, eval_set, score
from examples.restoration.model import ResidualCNN, load_model, save_model
from examples.span_sr.checkpoint import write_atomically, write_json

__all__ = ["ARMS", "arm_weights", "check_pair", "distill_steps", "loss_scales", "main", "markdown"]

ARMS = ("l1", "out", "out_aff", "rec_aff")


def arm_weights(arm: str, w_out: float, w_aff: float) -> dict[str, float]:
    """``w_rec``, ``w_out``, ``w_aff`` of the :class:`Distiller` of ``arm`` (one of :data:`ARMS`):
    l1 ``(1, 0, 0)``, out ``(1 - w_out, w_out, 0)``, out_aff ``(1 - w_out, w_out, w_aff)``,
    rec_aff ``(1, 0, w_aff)``."""
    table = {"l1": (1.0, 0.0, 0.0), "out": (1.0 - w_out, w_out, 0.0),
             "out_aff": (1.0 - w_out, w_out, w_aff), "rec_aff": (1.0, 0.0, w_aff)}
    if arm not in table:
        raise ValueError(f"arm {arm!r} is not one of {list(ARMS)}.")
    return dict(zip(("w_rec", "w_out", "w_aff"), table[arm]))


def check_pair(student: nn.Module, teacher: nn.Module, taps: dict[str, str], size: int = 24) -> None:
    """Raise ``ValueError`` when the teacher cannot teach the student: unknown tap layer, other
    output shape, or a tapped pair of layers at other resolutions (the affinity compares positions)."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    shapes, outs = {}, {}
    for who, model, names in (("student", student, {s: s for s in taps}), ("teacher", teacher, taps)):
        try:
            with FeatureTaps(model, names, detach=True) as tap, torch.no_grad():
                outs[who], shapes[who] = model(x).shape, {k: v.shape for k, v in tap.pop().items()}
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"the {who} does not fit: {exc}") from exc
    if outs["student"] != outs["teacher"]:
        raise ValueError(f"student output {tuple(outs['student'])} and teacher output "
                         f"{tuple(outs['teacher'])} differ; the teacher must restore the same images.")
    for s, t in taps.items():
        a, b = shapes["student"][s], shapes["teacher"][s]
        if a[2:] != b[2:]:
            raise ValueError(f"tap {s!r} -> {t!r}: student map {tuple(a)} and teacher map {tuple(b)} "
                             "have other spatial sizes; tap layers at the same resolution.")


def loss_scales(distillers: dict[str, Distiller], params: list[nn.Parameter], bad: Tensor,
                clean: Tensor) -> dict[str, dict[str, float]]:
    """Value and adapter-gradient norm of each single-term distiller (``{"rec": d, ...}``) on one batch."""
    out = {}
    for term, d in distillers.items():
        total, parts, _ = d(bad, clean)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))
        out[term] = {"value": float(parts[term]), "grad_norm": norm}
    return out


def distill_steps(distiller: Distiller, params: list[nn.Parameter], sampler: data.PatchSampler, task: Task,
                  pool: Tensor | None, *, steps: int, lr: float, batch: int, generator: torch.Generator,
                  margin: int = 0, log_every: int = 50, tag: str = "") -> list[dict[str, float]]:
    """``train_steps`` with the distiller's loss: Adam + cosine decay; returns every step's parts."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    log: list[dict[str, float]] = []
    distiller.student.train()
    for step in range(steps):
        bad, clean = train.draw_batch(sampler, task, pool, batch, generator, margin)
        total, parts, _ = distiller(bad, clean)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        log.append({"total": total.item(), **{k: float(v) for k, v in parts.items()}})
        if log_every and (step + 1) % log_every == 0:
            recent = log[-log_every:]
            print(f"  [{tag}] step {step + 1}/{steps}  " + "  ".join(
                f"{k} {sum(r[k] for r in recent) / len(recent):.5f}" for k in recent[0]), flush=True)
    distiller.student.eval()
    return log


def _test_cases(cfg: dict[str, Any], task: Task) -> tuple[list[Case], str]:
    ev = cfg["eval"]
    images, where = eval_set(cfg)
    kernels = eval_kernels(task, resolve_path(ev["levin"]), ev["seed"]) if task.kind == "blur" else []
    return degraded_cases(task, images, kernels, ev["seed"]), where


def markdown(res: dict[str, Any]) -> str:
    """The results as a Markdown table (PSNR / SSIM on the test set; Δ vs the ``l1`` arm)."""
    ref = res["arms"].get("l1", {}).get("psnr")
    lines = ["| model | trained | params trained | steps | seconds | PSNR (dB) | SSIM | Δ PSNR vs l1 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        delta = f"{r['psnr'] - ref:+.2f}" if ref is not None and name.startswith("adapter") else "—"
        lines.append(f"| {name} | {r['trained']} | {r['params']:,} | {r['steps']} | {r['seconds']} "
                     f"| {r['psnr']:.2f} | {r['ssim']:.4f} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the results (also written to ``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--config", default="configs/cpu_subset.yaml", help="data, adapter and eval settings")
    ap.add_argument("--base", default="runs/restoration_cpu_subset/base.safetensors", help="frozen base")
    ap.add_argument("--teacher", default=None, help="reuse this teacher instead of training one")
    ap.add_argument("--task", default="noise50")
    ap.add_argument("--out", default="runs/restoration_distill", help="run folder")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--teacher-channels", type=int, default=64)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=None, help="adapter steps (default: the config's)")
    ap.add_argument("--taps", nargs="+", default=["body.1", "body.4", "body.7"], help="same name in both")
    ap.add_argument("--p", type=int, default=2, choices=(1, 2), help="affinity exponent (1: FAKD)")
    ap.add_argument("--w-out", type=float, default=0.5)
    ap.add_argument("--w-aff", default="auto", help="affinity weight, or 'auto' (gradient-norm balance)")
    ap.epilog = "Any config value: --section.key VALUE, e.g. --adapter.rank 2 (the span_sr dialect)."
    args, rest = ap.parse_known_args(argv)
    try:
        wall, cfg = time.perf_counter(), apply_options(load_config(args.config), rest)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"distill.py: {err}") from None
    torch.set_num_threads(cfg["threads"])
    out, task, tr = Path(resolve_path(args.out) or "."), get_task(args.task), cfg["train"]
    out.mkdir(parents=True, exist_ok=True)
    steps = cfg["adapter"]["steps"] if args.steps is None else args.steps
    if steps < 1:
        raise SystemExit(f"--steps {steps}: the adapters need at least 1 step.")
    images = train.train_images(cfg)
    pool = train.kernel_pools(cfg, [task]).get(task.kernels or "")
    margin, base_path = train.blur_margin(cfg, task, pool), resolve_path(args.base)
    base = load_model(base_path)  # type: ignore[arg-type]
    cases, where = _test_cases(cfg, task)

    # (1) the teacher: a wider network, every weight trained on the task from scratch
    t_steps, t_sec = 0, 0.0
    if args.teacher:
        teacher = load_model(resolve_path(args.teacher))  # type: ignore[arg-type]
    elif not isinstance(base, ResidualCNN):
        raise SystemExit(f"--base is a {type(base).__name__}; the teacher is a wider ResidualCNN, so "
                         "the base must be one too (or pass --teacher).")
    else:
        torch.manual_seed(cfg["seed"])
        teacher = ResidualCNN(args.teacher_channels, base.depth, dilations=base.dilations)
        sampler, gen = train.task_stream(cfg, images, f"teacher/{task.name}", margin)
        t0, t_steps = time.perf_counter(), args.teacher_steps
        train.train_steps(teacher, list(teacher.parameters()), sampler, task, pool, steps=t_steps,
                          lr=args.teacher_lr, batch=tr["batch"], generator=gen, loss=tr["loss"],
                          tag=f"teacher {task.name}", margin=margin)
        t_sec = round(time.perf_counter() - t0, 1)
        save_model(teacher, out / "teacher.safetensors", extra={"task": task.name, "steps": t_steps})
    teacher.eval()
    taps, n_teacher = {t: t for t in args.taps}, sum(p.numel() for p in teacher.parameters())
    rows = {name: {"trained": what, "params": n, "steps": st, "seconds": sec, **score(model, cases)}
            for name, model, what, n, st, sec in (("input (degraded)", None, "—", 0, 0, 0.0),
                                                  ("base", base, "frozen", 0, 0, 0.0),
                                                  ("teacher", teacher, "all weights", n_teacher, t_steps, t_sec))}

    # (2) loss scales on the first batch (sets w_aff for 'auto'), then one fresh adapter per arm
    lora_cfg = train.adapter_config(cfg)
    student = load_model(base_path)  # type: ignore[arg-type]
    torch.manual_seed(cfg["seed"])  # the probe starts where every arm starts (same init)
    convlora.inject(student, lora_cfg, adapter_name="probe")
    check_pair(student, teacher, taps)
    sampler, gen = train.task_stream(cfg, images, task.name, margin)
    singles = {"rec": Distiller(student, teacher, w_rec=1, w_out=0),
               "out": Distiller(student, teacher, w_rec=0, w_out=1),
               "aff": Distiller(student, teacher, taps, w_rec=0, w_out=0, w_aff=1, p=args.p)}
    scales = loss_scales(singles, list(convlora.lora_parameters(student, "probe")),
                         *train.draw_batch(sampler, task, pool, tr["batch"], gen, margin))
    auto = scales["rec"]["grad_norm"] / max(scales["aff"]["grad_norm"], 1e-12)
    w_aff = float(f"{auto if args.w_aff == 'auto' else float(args.w_aff):.2g}")
    print(f"loss scales on the first batch: {scales}; w_aff = {w_aff}")
    arms: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        student = load_model(base_path)  # type: ignore[arg-type]
        torch.manual_seed(cfg["seed"])  # every arm starts from the same adapter init
        convlora.inject(student, lora_cfg, adapter_name=task.name)  # freezes the base
        params = list(convlora.lora_parameters(student, task.name))
        weights = arm_weights(arm, args.w_out, w_aff)
        distiller = Distiller(student, teacher, taps if weights["w_aff"] else None, p=args.p,
                              w_rec=weights["w_rec"], w_out=weights["w_out"], w_aff=weights["w_aff"])
        sampler, gen = train.task_stream(cfg, images, task.name, margin)
        t0 = time.perf_counter()
        log = distill_steps(distiller, params, sampler, task, pool, steps=steps, lr=cfg["adapter"]["lr"],
                            batch=tr["batch"], generator=gen, margin=margin, tag=arm)
        sec = round(time.perf_counter() - t0, 1)
        convlora.save_adapter(student, out / "adapters" / f"{arm}.safetensors", name=task.name,
                              metadata={"task": task.name, "arm": arm, **weights})
        k = max(1, steps // 10)
        last = {key: sum(r[key] for r in log[-k:]) / k for key in log[0]}
        arms[arm] = {**weights, "seconds": sec, "loss_last10pct": last, **score(student, cases)}
        rows[f"adapter: {arm}"] = {"trained": "rank-1 adapter", "params": sum(p.numel() for p in params),
                                   "steps": steps, "seconds": sec, **arms[arm]}
        print(f"{arm}: {arms[arm]['psnr']:.2f} dB / {arms[arm]['ssim']:.4f} in {sec:.0f}s", flush=True)

    # (3) results; per-image PSNRs are kept per arm (for paired comparisons), not per row
    for r in rows.values():
        r.pop("per_case", None)
    res = {"task": task.name, "test_set": where, "taps": taps, "p": args.p, "w_aff": w_aff,
           "w_out": args.w_out, "scales": scales, "arms": arms, "rows": rows, "args": vars(args),
           "wall_seconds": round(time.perf_counter() - wall, 1)}
    print(table := markdown(res))
    write_json(out / "results.json", res)
    summary = f"{task.name} on {where}; wall {res['wall_seconds']}s\n\n{table}\n"
    write_atomically(out / "results.md", lambda tmp: Path(tmp).write_text(summary))
    return res


if __name__ == "__main__":
    main()
