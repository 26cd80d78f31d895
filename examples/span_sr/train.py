"""Train a DSCLoRA student: ConvLoRA adapters on a pretrained SPAN, distilled from a teacher SPAN.

    python examples/span_sr/train.py                      # demo (configs/demo.yaml): CPU, no downloads
    python examples/span_sr/train.py --config examples/span_sr/configs/dsclora_x4.yaml
    python examples/span_sr/train.py --config examples/span_sr/configs/dsclora_x4.yaml \\
        --data.train /data/DIV2K/HR /data/LSDIR/HR --teacher span_ch28 --train.steps 20000
    python examples/span_sr/train.py --resume runs/dsclora_x4     # continue an interrupted run
    torchrun --nproc_per_node 2 examples/span_sr/train.py --config ...   # DDP: nccl on CUDA, gloo on CPU

Loss (``convlora.distill.Distiller``): ``w_rec * L1(SR, HR) + w_out * L1(SR, SR_teacher)
+ w_aff * mean over taps of the spatial-affinity loss`` (taps after each SPAB and ``conv_2``).
Only the adapters train (Adam, warm-up then cosine/multistep, grad clipping); the run folder gets
``config.yaml``, ``provenance.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``adapter.safetensors``,
``merged.safetensors``/``merged.pth`` (plain SPAN, official keys), ``results.json``,
``curves.png`` and ``comparison.png``. Gradients are averaged over ranks by one all-reduce per
step (what DDP does; the Distiller's hooks stay on the plain student), and each rank takes its
slice of the global batch, so N processes reproduce the 1-process run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.span_sr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.distributed as dist

import convlora
from convlora.distill import Distiller, FeatureTaps, affinity_loss
from examples.span_sr import checkpoint as ckpt
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.config import Config, dump_yaml, load_config, parse_args
from examples.span_sr.data import ImageSet, PatchDataset, list_images, rank_batches, split_holdout
from examples.span_sr.metrics import psnr_y, to_uint8

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


# ---------------------------------------------------------------------------- small helpers
def to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (or float) CHW batch -> float32 in [0, 1] on ``device`` (uint8 travels, floats are made there)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def first_tensor(output: object) -> torch.Tensor:
    """Tap selector: a SPAB returns ``(out, out1)``; distil its main output."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


def allreduce_mean_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks with one flat all-reduce (DDP's semantics, one bucket)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


@contextlib.contextmanager
def swapped(params: list[torch.nn.Parameter], ema: list[torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load the EMA weights into ``params`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_([p.data for p in params], ema)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], saved)


@torch.no_grad()
def mean_psnr(model: torch.nn.Module, images: ImageSet, device: torch.device) -> float:
    """Mean Y-PSNR (border = scale, SR rounded to uint8) over ``images``, as evaluate.py measures it."""
    values = []
    for lr, hr in zip(images.lr, images.hr):
        x = torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None]
        values.append(psnr_y(to_uint8(model(to_float(x, device)).float().cpu()), np.asarray(hr), border=images.scale))
    return float(np.mean(values))


class _Progress:
    """tqdm when installed (steps, loss parts, lr, it/s, ETA), else a line per log interval."""

    def __init__(self, start: int, total: int, enabled: bool, bar: bool) -> None:
        self.enabled, self.n, self.total, self.t0, self.start = enabled, start, total, time.time(), start
        self.bar = None
        if enabled and bar:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kw: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(kw, refresh=False)
        elif self.enabled:
            rate = (self.n - self.start) / max(1e-9, time.time() - self.t0)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"step {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in kw.items())
                  + f" | {rate:.2f} it/s, ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def resolve_weights(spec: str, weights_dir: str) -> Path:
    """A weights file path, or ``<weights_dir>/<spec>.pth`` (``weights_dir`` relative to the repo)."""
    if Path(spec).is_file():
        return Path(spec)
    folder = Path(weights_dir) if Path(weights_dir).is_absolute() else REPO / weights_dir
    candidate = folder / f"{spec}.pth"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.pth")) if folder.is_dir() else []
    raise FileNotFoundError(f"weights {spec!r} not found (tried {spec!r} and {str(candidate)!r}); "
                            f"give a file path or one of {known or 'the names in --model.weights_dir'}.")


def load_weights(path: Path) -> SPAN:
    """``load_span`` with an error that names the file."""
    try:
        return load_span(path)
    except Exception as err:
        raise ValueError(f"cannot load SPAN weights from {str(path)!r}: {err}") from err


def build_student(base: SPAN, lora: str) -> torch.nn.Module:
    """The DSCLoRA student: a deep copy of ``base`` with adapters, only the adapters trainable."""
    student = copy.deepcopy(base)
    if lora == "dsclora":
        from examples.span_sr.lora_config import build_dsclora

        student = build_dsclora(student)
    else:  # a YAML file of convlora.LoRAConfig fields
        from examples.span_sr.lora_config import build_dsclora

        student = build_dsclora(student, lora)
    convlora.mark_only_lora_trainable(student)
    return student


def lr_factor(step: int, cfg: Config) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to ``min_lr``, multistep or constant."""
    t = cfg.train
    if t.warmup and step < t.warmup:
        return (step + 1) / t.warmup
    if t.schedule == "cosine":
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.min_lr + (1 - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if t.schedule == "multistep":
        return t.gamma ** sum(step >= m for m in t.milestones)
    if t.schedule == "constant":
        return 1.0
    raise ValueError(f"train.schedule={t.schedule!r}; use 'cosine', 'multistep' or 'constant'.")


@torch.no_grad()
def tap_losses(base: torch.nn.Module, teacher: torch.nn.Module, taps: dict[str, str], data: PatchDataset,
               cfg: Config, device: torch.device) -> dict[str, float]:
    """Affinity loss per tap between the untouched base and the teacher on step 0's global batch.

    It depends on neither the rank nor the resume point, so every process of every (resumed)
    run derives the same per-tap normalisation from it.
    """
    lr = to_float(torch.stack([data[i][0] for i in range(cfg.data.batch)]), device)
    with FeatureTaps(base, taps.keys(), select=first_tensor) as s_taps, \
            FeatureTaps(teacher, taps, select=first_tensor) as t_taps:
        base(lr)
        teacher(lr)
        s_feats, t_feats = s_taps.pop(), t_taps.pop()
    return {k: float(affinity_loss(s_feats[k], t_feats[k], p=cfg.loss.p, pool=cfg.loss.pool or None)) for k in taps}


def train_substitute(width: int, steps: int, images: ImageSet, cfg: Config, device: torch.device,
                     seed: int, label: str) -> SPAN:
    """Demo only: train a small deploy-form SPAN from scratch with L1 (a stand-in for pretrained weights)."""
    torch.manual_seed(seed)
    model = SPAN(feature_channels=width, upscale=cfg.data.scale, form="deploy").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.demo.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    data = PatchDataset(images, cfg.demo.patch, seed)
    t0 = time.time()
    for step, idx in enumerate(rank_batches(0, steps, cfg.demo.batch)):
        lr, hr = (torch.stack(x) for x in zip(*(data[i] for i in idx)))
        loss = (model(to_float(lr, device)) - to_float(hr, device)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            print(f"  [demo substitute {label}] step {step + 1}/{steps} L1 {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Run training as configured by ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)


def _run(argv: list[str]) -> int:
    # ------------------------------------------------------------------ config
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nOptions (defaults from configs/demo.yaml unless --config is given):\n"
              + dump_yaml(load_config(DEFAULT_CONFIG).to_dict()))
        return 0
    config_path, resume, overrides = parse_args(argv)
    if resume and config_path is None:
        config_path = str(Path(resume) / "config.yaml")
    cfg = load_config(config_path or DEFAULT_CONFIG, overrides)
    if resume:
        cfg.out = resume
    run = Path(cfg.out)

    # ------------------------------------------------------------------ setup: DDP, device, seed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if want_cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    main_proc = rank == 0
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    say = print if main_proc else (lambda *a, **k: None)

    # ------------------------------------------------------------------ data
    scale, hr_patch = cfg.data.scale, cfg.data.patch * cfg.data.scale
    cache = cfg.data.cache_dir or str(run.parent / ".cache")
    refs = list_images(cfg.data.train) if cfg.data.train else []
    if not refs:
        raise ValueError("no training data: set --data.train to one or more HR image folders.")
    if cfg.data.val:
        train_refs, val_refs = refs, list_images(cfg.data.val)
    else:
        train_refs, val_refs = split_holdout(refs, cfg.data.val_holdout)
    if world > 1 and not main_proc:
        dist.barrier()  # rank 0 fills the decode/LR cache first
    train_set = ImageSet.load(train_refs, scale, lr_mode=cfg.data.lr_mode, cache_dir=cache,
                              min_hr=hr_patch, small=cfg.data.small)
    val_set = ImageSet.load(val_refs, scale, cache_dir=cache, max_side=cfg.data.val_max_side) if val_refs else None
    if world > 1 and main_proc:
        dist.barrier()
    say(f"data: {len(train_set.hr)} training images, {len(val_refs)} validation images"
        f"{' (held out from the training folders)' if not cfg.data.val else ''}, LR {cfg.data.lr_mode}")

    # ------------------------------------------------------------------ models
    run.mkdir(parents=True, exist_ok=True)
    weights: dict[str, str] = {}
    for role in ("teacher", "base"):
        spec = getattr(cfg.model, role)
        if spec == "" or (cfg.demo.enabled and spec in ("", "none")):
            if not cfg.demo.enabled:
                raise ValueError(f"model.{role} is empty; give weights or enable the demo substitute.")
            path = run / f"demo_{role}.pth"
            if not path.is_file():
                say(f"DEMO SUBSTITUTE: no pretrained {role} given; training a SPAN width "
                    f"{getattr(cfg.demo, role + '_width')} from scratch for {getattr(cfg.demo, role + '_steps')} steps")
                model = train_substitute(getattr(cfg.demo, role + "_width"), getattr(cfg.demo, role + "_steps"),
                                         train_set, cfg, device, cfg.train.seed + (1 if role == "teacher" else 2), role)
                if main_proc:
                    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
                if world > 1:
                    dist.barrier()
            weights[role] = str(path)
        elif not (role == "teacher" and spec == "base"):
            weights[role] = str(resolve_weights(spec, cfg.model.weights_dir))
    base = load_weights(Path(weights["base"]))
    teacher = copy.deepcopy(base) if "teacher" not in weights else load_weights(Path(weights["teacher"]))
    if teacher.upscale != base.upscale or base.upscale != scale:
        raise ValueError(f"scales differ: student base x{base.upscale}, teacher x{teacher.upscale}, data x{scale}; "
                         "use weights of the same scale and set --data.scale to it.")
    student = build_student(base, cfg.model.lora).to(device)
    base, teacher = base.to(device).requires_grad_(False), teacher.to(device).requires_grad_(False)
    if device.type == "cuda" and cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)  # in place (Module.to returns self)
        teacher.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    say(f"student: {sum(p.numel() for p in params):,} trainable adapter parameters; teacher "
        f"{weights.get('teacher', 'base')}; base {weights['base']}")
    taps = {t: t for t in cfg.loss.taps}
    tap_weights, w_aff = None, cfg.loss.w_aff
    if cfg.loss.w_aff and cfg.loss.aff_norm:  # every tap starts at 1, the whole term at w_aff
        init = tap_losses(base, teacher, taps, PatchDataset(train_set, cfg.data.patch, cfg.train.seed), cfg, device)
        floor = 0.01 * max(init.values())  # a tap where student and teacher already agree is not blown up
        tap_weights = [1.0 / max(init[k], floor, 1e-12) for k in taps]
        w_aff = cfg.loss.w_aff * sum(tap_weights) / len(tap_weights)
        say("affinity per tap at the start (base vs teacher): " + ", ".join(f"{k} {v:.3g}" for k, v in init.items()))
    distiller = Distiller(student, teacher, taps=taps, w_rec=cfg.loss.w_rec, w_out=cfg.loss.w_out, w_aff=w_aff,
                          p=cfg.loss.p, pool=cfg.loss.pool or None, tap_weights=tap_weights,
                          aff_warmup_steps=cfg.loss.aff_warmup, select=first_tensor)
    forward = torch.compile(distiller.__call__) if cfg.train.compile else distiller

    # ------------------------------------------------------------------ optimizer, state, resume
    opt = torch.optim.Adam(params, lr=cfg.train.lr, betas=(cfg.train.betas[0], cfg.train.betas[1]), weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = [p.detach().clone() for p in params] if cfg.train.ema else None
    start = 0
    best: dict[str, Any] = {"psnr": -math.inf, "step": 0, "params": None}
    if resume:
        state = ckpt.load_checkpoint(run / "checkpoint.pt")
        ckpt.load_trainable_state(student, state["params"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        start, best = state["step"], state["best"]
        if ema is not None and state.get("ema") is not None:
            ema = [t.to(device) for t in state["ema"]]
        say(f"resumed {run} at step {start}")
    if main_proc:
        (run / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
        ckpt.dump_json(run / "provenance.json", ckpt.provenance(
            seed=cfg.train.seed, data={"train": train_set.refs, "val": val_refs}, weights=weights,
            extra={"args": argv, "world_size": world, "device": str(device), "resumed_from_step": start}))
    log = ckpt.MetricsLog(run / "metrics.jsonl", truncate_after=start, enabled=main_proc)

    def checkpoint(step: int) -> None:
        if main_proc:
            ckpt.save_checkpoint(run / "checkpoint.pt", step=step, params=ckpt.trainable_state(student),
                                 optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=ckpt.rng_state(),
                                 ema=[t.cpu() for t in ema] if ema is not None else None, best=best)

    def validate(step: int) -> float:
        assert val_set is not None  # only called when there is a validation set
        with swapped(params, ema):
            value = mean_psnr(student, val_set, device)
        if value > best["psnr"]:
            best.update(psnr=value, step=step, params=ckpt.trainable_state(student) if ema is None else
                        {n: e.cpu().clone() for (n, _), e in zip(ckpt.trainable_state(student).items(), ema)})
        log.write({"step": step, "val_psnr": value, "best_psnr": best["psnr"], "best_step": best["step"]})
        say(f"step {step}: validation Y-PSNR {value:.3f} dB (best {best['psnr']:.3f} at step {best['step']})")
        return value

    if val_set is not None and start == 0 and main_proc:
        ref = {"val_base": mean_psnr(base, val_set, device), "val_teacher": mean_psnr(teacher, val_set, device)}
        log.write({"step": 0, **ref})
        say(f"validation Y-PSNR: base {ref['val_base']:.3f} dB, teacher {ref['val_teacher']:.3f} dB")

    # ------------------------------------------------------------------ loop
    stop = {"signal": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, checkpoint, exit (main() restores them)
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    loader = torch.utils.data.DataLoader(
        PatchDataset(train_set, cfg.data.patch, cfg.train.seed),
        batch_sampler=rank_batches(start, cfg.train.steps, cfg.data.batch, rank, world),
        num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.data.workers else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.amp)
    bar = _Progress(start, cfg.train.steps, enabled=main_proc, bar=cfg.train.progress)
    sums, count, t0, t_start, step, exit_code = None, 0, time.time(), time.time(), start, 0
    for step, (lr, hr) in enumerate(loader, start + 1):  # `step` counts completed steps
        lr, hr = to_float(lr, device), to_float(hr, device)
        if device.type == "cuda" and cfg.train.channels_last:
            lr = lr.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss, parts, _ = forward(lr, hr, step=step - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            allreduce_mean_grads(params, world)
        if cfg.train.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
        opt.step()
        sched.step()
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - cfg.train.ema)
        values = torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in ("rec", "out", "aff")])
        sums, count = (values if sums is None else sums + values), count + 1
        bar.update(1)
        last = step == cfg.train.steps
        timeout = cfg.train.time_limit and time.time() - t_start > cfg.train.time_limit
        do_val = val_set is not None and ((cfg.train.val_every and step % cfg.train.val_every == 0) or last or timeout)
        do_ckpt = (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or last
        interrupted = stop["signal"] or (cfg.train.stop_after and step - start >= cfg.train.stop_after)
        if world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(bool(interrupted)), float(bool(timeout))], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            interrupted, timeout = bool(flag[0]), bool(flag[1])
        if step % cfg.train.log_every == 0 or last or do_val or do_ckpt or interrupted or timeout:
            if world > 1:  # the global batch's mean, as one process would log it
                dist.all_reduce(sums)
                sums /= world
            mean = (sums / count).tolist()
            if not all(math.isfinite(v) for v in mean):
                say(f"step {step}: loss is {mean[0]} (rec {mean[1]}, out {mean[2]}, aff {mean[3]}): stopping. "
                    f"The last good checkpoint is kept in {run / 'checkpoint.pt'}; lower --train.lr or check the data.")
                exit_code = 3
                break
            rate = count / (time.time() - t0)
            log.write({"step": step, "loss": mean[0], "rec": mean[1], "out": mean[2], "aff": mean[3],
                       "lr": sched.get_last_lr()[0], "it_s": rate})
            bar.set_postfix(loss=f"{mean[0]:.4f}", rec=f"{mean[1]:.4f}", out=f"{mean[2]:.4f}",
                            aff=f"{mean[3]:.2e}", lr=f"{sched.get_last_lr()[0]:.1e}")
            sums, count, t0 = None, 0, time.time()
        if do_val and main_proc:
            validate(step)
        if do_ckpt or interrupted:
            checkpoint(step)
        if interrupted:
            why = f"signal {stop['signal']}" if stop["signal"] else f"train.stop_after={cfg.train.stop_after}"
            say(f"\nstopped at step {step} ({why}); checkpoint written. Continue with: "
                f"python examples/span_sr/train.py --resume {run}")
            exit_code = 128 + stop["signal"] if stop["signal"] else 0
            break
        if timeout:
            say(f"\ntime limit {cfg.train.time_limit:.0f}s reached at step {step}; finishing the run there")
            checkpoint(step)
            break
    bar.close()
    if exit_code or (step < cfg.train.steps and not timeout) or not main_proc:
        if world > 1:
            dist.destroy_process_group()
        return exit_code

    # ------------------------------------------------------------------ exports and report
    if best["params"] is not None:
        ckpt.load_trainable_state(student, best["params"])
        say(f"using the best validation adapter: step {best['step']}, {best['psnr']:.3f} dB")
    elif ema is not None:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], ema)  # export the EMA weights
    student = student.to(memory_format=torch.contiguous_format)
    convlora.save_adapter(student, run / "adapter.safetensors", metadata={"best_step": best["step"], "config": cfg.to_dict()})
    merged = ckpt.export_merged(student, run).to(device)
    models = {"base": base, "teacher": teacher, "student": merged}
    results: dict[str, dict[str, float]] = {}
    if val_set is not None:
        results["val (held out)" if not cfg.data.val else "val"] = {n: mean_psnr(m, val_set, device) for n, m in models.items()}
    for folder in cfg.data.test:
        hr_dir = Path(folder) / "HR" if (Path(folder) / "HR").is_dir() else Path(folder)
        test_set = ImageSet.load(list_images([str(hr_dir)]), scale, cache_dir=cache)
        results[Path(folder).name] = {n: mean_psnr(m, test_set, device) for n, m in models.items()}
    ckpt.dump_json(run / "results.json", {"y_psnr_db": results, "best_step": best["step"], "steps": step})
    say(f"\nY-PSNR (dB, border {scale}, MATLAB-bicubic LR)\n{'set':<18}" + "".join(f"{n:>10}" for n in models))
    for name, row in results.items():
        say(f"{name:<18}" + "".join(f"{v:>10.3f}" for v in row.values()))
    if not ckpt.plot_curves(log.read(), run / "curves.png"):
        say("matplotlib is not installed: curves.png skipped")
    if val_set is not None:
        lr0 = torch.from_numpy(np.array(val_set.lr[0])).permute(2, 0, 1)[None].float() / 255.0
        strip = ckpt.comparison_strip(lr0, np.asarray(val_set.hr[0]), {"base": base, "student": merged, "teacher": teacher})
        ckpt.write_png(run / "comparison.png", strip)
    say(f"\noutputs in {run}/: " + ", ".join(sorted(p.name for p in run.iterdir() if p.is_file()))
        + f"\nmerged.pth is a plain SPAN with the official keys; try it:\n  python examples/span_sr/upscale.py "
        f"--weights {run / 'merged.pth'} --input IMAGE --output OUT_DIR")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
