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

# The script reads top to bottom; reusable pieces live beside it: train_utils.py (device/DDP,
# schedule, optimizer + EMA, progress), train_models.py (weights, demo substitutes, student,
# affinity normalisation) and validation.py (Y-PSNR validation, exports, final report).

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.span_sr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from convlora.distill import Distiller
from examples.span_sr import checkpoint as ckpt
from examples.span_sr.config import dump_yaml, load_config, parse_args
from examples.span_sr.data import ImageSet, PatchDataset, list_images, rank_batches, split_holdout
from examples.span_sr.train_models import (
    affinity_tap_weights,
    build_student,
    load_pair,
    prepare_weights,
)
from examples.span_sr.train_utils import (
    LossMeter,
    Progress,
    allreduce_mean_grads,
    build_optimizer,
    first_tensor,
    setup_device,
    sync_flags,
    to_float,
)
from examples.span_sr.validation import export_student, final_report, reference_psnr, validate

__all__ = ["main"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


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
    world, rank, device = setup_device(cfg)
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
    ckpt.prepare_run_dir(run, resume, say)
    weights = prepare_weights(cfg, run, train_set, device, main_proc, world, say)
    torch.manual_seed(cfg.train.seed)  # same adapter init whether or not demo substitutes just trained
    base, teacher = load_pair(weights, scale)
    student = build_student(base, cfg.model.lora).to(device)
    base, teacher = base.to(device).requires_grad_(False), teacher.to(device).requires_grad_(False)
    if device.type == "cuda" and cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)  # in place (Module.to returns self)
        teacher.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    say(f"student: {sum(p.numel() for p in params):,} trainable adapter parameters; teacher "
        f"{weights.get('teacher', 'base')}; base {weights['base']}")
    taps = {t: t for t in cfg.loss.taps}
    tap_weights, w_aff = affinity_tap_weights(base, teacher, taps, train_set, cfg, device, say)
    distiller = Distiller(student, teacher, taps=taps, w_rec=cfg.loss.w_rec, w_out=cfg.loss.w_out, w_aff=w_aff,
                          p=cfg.loss.p, pool=cfg.loss.pool or None, tap_weights=tap_weights,
                          aff_warmup_steps=cfg.loss.aff_warmup, select=first_tensor)
    forward = torch.compile(distiller.__call__) if cfg.train.compile else distiller

    # ------------------------------------------------------------------ optimizer, state, resume
    opt, sched, ema = build_optimizer(params, cfg)
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
    log = ckpt.MetricsLog(run / "metrics.jsonl", truncate_after=start if resume else -1, enabled=main_proc)

    def checkpoint(step: int) -> None:
        if main_proc:
            ckpt.save_checkpoint(run / "checkpoint.pt", step=step, params=ckpt.trainable_state(student),
                                 optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=ckpt.rng_state(),
                                 ema=[t.cpu() for t in ema] if ema is not None else None, best=best)

    if val_set is not None and start == 0 and main_proc:
        reference_psnr(base, teacher, val_set, device, log, say)

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
    bar = Progress(start, cfg.train.steps, enabled=main_proc, bar=cfg.train.progress)
    meter, t_start, step, exit_code = LossMeter(), time.time(), start, 0
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
        meter.add(loss, parts)
        bar.update(1)
        last = step == cfg.train.steps
        timeout = cfg.train.time_limit and time.time() - t_start > cfg.train.time_limit
        do_val = val_set is not None and ((cfg.train.val_every and step % cfg.train.val_every == 0) or last or timeout)
        do_ckpt = (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or last
        interrupted = stop["signal"] or (cfg.train.stop_after and step - start >= cfg.train.stop_after)
        interrupted, timeout = sync_flags(interrupted, timeout, world, device)  # every rank stops at the same step
        if step % cfg.train.log_every == 0 or last or do_val or do_ckpt or interrupted or timeout:
            mean = meter.mean(world)  # the global batch's mean, as one process would log it
            if not all(math.isfinite(v) for v in mean):
                say(f"step {step}: loss is {mean[0]} (rec {mean[1]}, out {mean[2]}, aff {mean[3]}): stopping. "
                    f"The last good checkpoint is kept in {run / 'checkpoint.pt'}; lower --train.lr or check the data.")
                exit_code = 3
                break
            log.write({"step": step, "loss": mean[0], "rec": mean[1], "out": mean[2], "aff": mean[3],
                       "lr": sched.get_last_lr()[0], "it_s": meter.rate()})
            bar.set_postfix(loss=f"{mean[0]:.4f}", rec=f"{mean[1]:.4f}", out=f"{mean[2]:.4f}",
                            aff=f"{mean[3]:.2e}", lr=f"{sched.get_last_lr()[0]:.1e}")
            meter.reset()
        if do_val and main_proc:
            assert val_set is not None  # do_val implies a validation set
            validate(student, params, ema, val_set, device, best, step, log, say)
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
    if exit_code or (step < cfg.train.steps and not timeout):
        if world > 1:
            dist.destroy_process_group()
        return exit_code

    # ------------------------------------------------------------------ exports and report
    if main_proc:
        merged = export_student(student, params, ema, best, cfg, run, say).to(device)
        final_report({"base": base, "teacher": teacher, "student": merged}, val_set, cfg, run, cache,
                     best["step"], step, log, device, say)
    if world > 1:  # the other ranks wait for rank 0's exports: a rank leaving early can abort in gloo
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
