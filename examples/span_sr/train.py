"""Train a DSCLoRA student: ConvLoRA adapters on a pretrained SPAN, distilled from a teacher SPAN.

    python examples/span_sr/train.py                      # demo (configs/demo.yaml): CPU, no downloads
    python examples/span_sr/train.py --config examples/span_sr/configs/dsclora_x4.yaml
    python examples/span_sr/train.py --config examples/span_sr/configs/dsclora_x4.yaml \\
        --data.train /data/DIV2K/HR /data/LSDIR/HR --teacher span_ch28 --train.steps 20000
    python examples/span_sr/train.py --resume runs/dsclora_x4     # continue an interrupted run
    torchrun --nproc_per_node 2 examples/span_sr/train.py --config ...   # DDP: nccl on CUDA, gloo on CPU

The method (student, teacher, taps, loss, deployment) is in ``dsclora.py``; this script is the
run around it, top to bottom: config, setup and DDP, data, models, loss, optimizer + EMA
(``AveragedModel``), loop, best-step selection, export. Only the adapters train (Adam, warm-up
then cosine/multistep, grad clipping). Under ``torchrun`` the student is wrapped in
``DistributedDataParallel`` and each rank takes its slice of the global batch, so N processes
reproduce the 1-process run. The run folder gets ``config.yaml``, ``provenance.json``,
``metrics.jsonl``, ``checkpoint.pt``, ``adapter.safetensors``, ``merged.safetensors``/``merged.pth``
(plain SPAN, official keys), ``results.json``, ``curves.png`` and ``comparison.png``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.span_sr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import convlora
from examples.span_sr import checkpoint as ckpt
from examples.span_sr import dsclora, report
from examples.span_sr.arch import SPAN
from examples.span_sr.config import Config, TrainConfig, dump_yaml, load_config, parse_args
from examples.span_sr.data import (
    ImageSet,
    PatchDataset,
    image_refs,
    rank_batches,
    row_kinds,
    split_holdout,
    to_float,
    upcycle_region,
)
from examples.span_sr.degrade import imresize_matlab
from examples.span_sr.demo import train_substitute
from examples.span_sr.ensemble import SelfEnsemble
from examples.span_sr.evaluate import score
from examples.span_sr.images import write_image
from examples.span_sr.outputs import refuse_inputs
from examples.span_sr.teacher_cache import CacheSpec, TeacherCache, weights_digest
from examples.span_sr.upscale import upscale_image

__all__ = ["distill_checks", "lr_factor", "main", "teacher_only_refs"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def lr_factor(step: int, t: TrainConfig) -> float:
    """Learning-rate multiplier of ``LambdaLR``: linear warm-up, then cosine to ``min_lr``, multistep or constant."""
    if t.warmup and step < t.warmup:
        return (step + 1) / t.warmup
    if t.schedule == "cosine":
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.min_lr + (1 - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if t.schedule == "multistep":
        return t.gamma ** sum(step >= m for m in t.milestones)
    return 1.0  # "constant" (config.py admits no other value)


def mean_psnr(model: torch.nn.Module, images: ImageSet) -> float:
    """Mean Y-PSNR (border = scale, SR rounded to uint8) over ``images``, as evaluate.py measures it."""
    pairs = zip(images.refs, map(np.asarray, images.hr), map(np.array, images.lr))
    return score(lambda lr: upscale_image(model, lr), pairs, images.scale, ["psnr_y"])["mean"]["psnr_y"]


def _architecture(model: torch.nn.Module) -> str:
    return f"{type(model).__name__}:{getattr(model, 'architecture', '')}"


def distill_checks(cfg: Config, world: int) -> None:
    """The teacher-cache, upcycling and teacher-only settings that cannot work together, refused before any work.

    Raises:
        ValueError: the cache with ``lr_mode: float`` or with the affinity term; the affinity term
            with a self-ensemble teacher; an upcycled or teacher-only share that gives no row, or
            shares that together ask for more rows than the batch; teacher-only folders without a
            share, a share without folders, or either with ``loss.w_out == 0`` (no teacher term);
            rows without an HR whose count per batch cannot be split evenly over the DDP ranks.
    """
    if cfg.teacher_cache.enabled and cfg.data.lr_mode != "cache":
        raise ValueError("teacher_cache.enabled needs data.lr_mode 'cache': with 'float' each patch's LR is made on "
                         "the fly, so there is no whole LR image to run the teacher on once.")
    if cfg.teacher_cache.enabled and cfg.loss.w_aff:
        raise ValueError(f"loss.w_aff={cfg.loss.w_aff} needs the teacher's features at every step, which cached "
                         "outputs do not have: set --teacher_cache.enabled false or --loss.w_aff 0.")
    if cfg.model.teacher_ensemble > 1 and cfg.loss.w_aff:
        raise ValueError(f"loss.w_aff={cfg.loss.w_aff} with model.teacher_ensemble={cfg.model.teacher_ensemble}: a "
                         "self-ensemble has no single feature map to take the affinity of; set one of them off "
                         "(--loss.w_aff 0 or --model.teacher_ensemble 1).")
    if cfg.data.upcycle_share and 0 < cfg.data.upcycle_side < cfg.data.patch:
        raise ValueError(f"data.upcycle_side={cfg.data.upcycle_side} is smaller than the {cfg.data.patch}x{cfg.data.patch} "
                         "LR patch cut from it; raise it to at least data.patch (0 = whole images).")
    m = round(cfg.data.upcycle_share * cfg.data.batch)
    if cfg.data.upcycle_share and m == 0:
        raise ValueError(f"data.upcycle_share={cfg.data.upcycle_share} of a batch of {cfg.data.batch} is no row; "
                         f"use at least {1 / cfg.data.batch:.3g} or 0.")
    share, folders = cfg.data.teacher_only_share, cfg.data.teacher_only
    if folders and not share:
        raise ValueError(f"data.teacher_only={folders} but data.teacher_only_share is 0, so no batch would use them; "
                         "give the share of each batch (e.g. --data.teacher_only_share 0.25) or --data.teacher_only none.")
    if share and not folders:
        raise ValueError(f"data.teacher_only_share={share} but data.teacher_only names no folder; give the "
                         "teacher-only image folders (--data.teacher_only DIR ...) or set the share to 0.")
    t = round(share * cfg.data.batch)
    if share and t == 0:
        raise ValueError(f"data.teacher_only_share={share} of a batch of {cfg.data.batch} is no row; "
                         f"use at least {1 / cfg.data.batch:.3g} or 0.")
    if share and not cfg.loss.w_out:
        raise ValueError("data.teacher_only rows are labelled by the teacher term alone, and loss.w_out is 0: give "
                         "it a weight (e.g. --loss.w_out 0.8) or drop the teacher-only rows (--data.teacher_only_share 0).")
    row_kinds(cfg.data.batch, cfg.data.upcycle_share, share)  # their sum fits in the batch
    if t and (m + t) % world:
        raise ValueError(f"data.upcycle_share={cfg.data.upcycle_share} and data.teacher_only_share={share} give "
                         f"{m} + {t} rows without an HR per batch, not divisible by {world} processes; choose "
                         "shares whose rows split evenly over the ranks (every rank needs as many real rows).")
    if not t and m % world:
        raise ValueError(f"data.upcycle_share={cfg.data.upcycle_share} gives {m} upcycled rows per batch, not "
                         f"divisible by {world} processes; choose a share whose rows split evenly over the ranks.")


def teacher_only_refs(cfg: Config, train_folders_refs: list[str], held: set[str]) -> list[str]:
    """The teacher-only images of ``cfg.data.teacher_only``, less the validation images ``held`` (resolved paths).

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: an image that is also in ``data.train`` (its HR would be a target there), or
            folders left with no image once the validation images are taken out.
    """
    if not cfg.data.teacher_only:
        return []
    refs = [r for r in image_refs(cfg.data.teacher_only) if str(Path(r).resolve()) not in held]
    train = {str(Path(r).resolve()) for r in train_folders_refs}
    both = [r for r in refs if str(Path(r).resolve()) in train]
    if both:
        raise ValueError(f"{len(both)} image(s) of data.teacher_only are also in data.train (e.g. {both[0]!r}): an "
                         "image is either an HR target or a teacher-only input; remove its folder from one of the two.")
    if not refs:
        raise ValueError(f"data.teacher_only={cfg.data.teacher_only} holds no image besides the validation images; "
                         "give other folders or --data.teacher_only none.")
    return refs


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run training as configured by ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Bad configs, missing weights, data or a run folder that cannot be resumed end with a one-line
    message and status 2, before the run folder is created.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except (FileNotFoundError, ImportError, ValueError) as err:
        if argv is not None:  # called from Python: the caller gets the exception
            raise
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; every file already written is complete (written atomically). During "
              "training the run continues with --resume OUT; the final export and evaluation run again "
              "when it is resumed", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)


def _run(argv: list[str]) -> int:
    # ------------------------------------------------------------------ config, checked before anything is written
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nOptions (defaults from configs/demo.yaml unless --config is given):\n"
              + dump_yaml(load_config(DEFAULT_CONFIG).to_dict()))
        return 0
    config_path, resume, overrides = parse_args(argv)
    state = None
    if resume:
        state = ckpt.load_checkpoint(Path(resume) / "checkpoint.pt")  # refuses an older layout
        config_path = config_path or str(Path(resume) / "config.yaml")
    cfg = load_config(config_path or DEFAULT_CONFIG, overrides)
    if resume:
        cfg.out = resume
    run, scale = Path(cfg.out), cfg.data.scale
    lora = None if cfg.model.full_finetune else dsclora.load_lora_config(cfg.model.lora)
    weights: dict[str, str] = {}  # role -> file
    substitutes = []  # roles left empty in the demo: trained below, once the run folder exists
    for role in ("teacher", "base"):
        spec = getattr(cfg.model, role)
        if spec in ("", "none") and cfg.demo.enabled:
            weights[role] = str(run / f"demo_{role}.pth")
            substitutes.append(role)
        elif spec == "":
            raise ValueError(f"model.{role} is empty; give weights (--model.{role} NAME_OR_FILE) or enable the "
                             "demo substitute (--demo.enabled true).")
        elif not (role == "teacher" and spec == "base"):
            weights[role] = str(dsclora.resolve_weights(spec, cfg.model.weights_dir))
    with torch.random.fork_rng():  # checks only: the models are loaded again below, in the seeded order
        check_base = (SPAN(feature_channels=cfg.demo.base_width, upscale=scale, form="deploy") if substitutes
                      else dsclora.load_pair(weights["base"], weights.get("teacher"), scale)[0])
        dsclora.build_student(check_base, lora)  # a rank_pattern key matching no layer stops here
    exports = ["adapter.safetensors", "merged.safetensors", "merged.pth", "checkpoint.pt", "metrics.jsonl",
               "provenance.json", "results.json", *([] if resume else ["config.yaml"])]
    refuse_inputs([run / n for n in exports], [weights.get(r) for r in ("base", "teacher") if r not in substitutes]
                  + [None if resume else config_path, None if lora is None else str(cfg.model.lora)], "--out")
    distill_checks(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    refs = image_refs(cfg.data.train)
    if not refs:
        raise ValueError("no training data: set --data.train to one or more HR image folders.")
    if cfg.data.val:  # a validation image inside the training folders is left out of training (no leak)
        val_refs = image_refs(cfg.data.val)
        held = {str(Path(r).resolve()) for r in val_refs}
        train_refs = [r for r in refs if str(Path(r).resolve()) not in held]
    else:
        train_refs, val_refs = split_holdout(refs, cfg.data.val_holdout)
        held = {str(Path(r).resolve()) for r in val_refs}
    only_refs = teacher_only_refs(cfg, refs, held)  # a validation image in those folders is left out too
    tests = {Path(f).name: image_refs([str(Path(f) / "HR") if (Path(f) / "HR").is_dir() else f])
             for f in cfg.data.test}

    # ------------------------------------------------------------------ setup: DDP, device, seed
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if cfg.data.batch % world:
        raise ValueError(f"global batch {cfg.data.batch} is not divisible by {world} processes; "
                         "choose --data.batch as a multiple of the number of ranks.")
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if want_cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    main_proc = rank == 0
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    say = tqdm.write if main_proc else (lambda line: None)  # through the bar's writer: never glued to it

    # ------------------------------------------------------------------ data
    cache = cfg.data.cache_dir or str(run.parent / ".cache")
    if world > 1 and not main_proc:
        dist.barrier()  # rank 0 fills the decode/LR cache first
    train_set = ImageSet.load(train_refs, scale, lr_mode=cfg.data.lr_mode, cache_dir=cache,
                              min_hr=cfg.data.patch * scale, small=cfg.data.small)
    only_set = ImageSet.load(only_refs, scale, lr_mode=cfg.data.lr_mode, cache_dir=cache,
                             min_hr=cfg.data.patch * scale, small=cfg.data.small) if only_refs else None
    val_set = ImageSet.load(val_refs, scale, cache_dir=cache, max_side=cfg.data.val_max_side) if val_refs else None
    if world > 1 and main_proc:
        dist.barrier()
    say(f"data: {len(train_set.hr)} training images, {len(val_refs)} validation images"
        f"{' (held out from the training folders)' if not cfg.data.val else ''}, LR {cfg.data.lr_mode}"
        + (f"; {len(only_set.hr)} teacher-only images ({round(cfg.data.teacher_only_share * cfg.data.batch)} rows "
           "of each batch, no HR term)" if only_set is not None else ""))

    # ------------------------------------------------------------------ run folder, demo substitutes, models
    if main_proc:
        found = ckpt.earlier_run(run)
        if found and not resume:
            say(f"note: {run} already holds a run ({', '.join(found)}); this fresh run replaces its files. "
                f"Pass --out NEW_FOLDER to keep it, or --resume {run} to continue it.")
        run.mkdir(parents=True, exist_ok=True)
    for role in substitutes:
        path = Path(weights[role])
        if not path.is_file():
            if main_proc:
                seed = cfg.train.seed + (1 if role == "teacher" else 2)
                substitute = train_substitute(role, cfg.demo, train_set, device, seed)
                torch.save({k: v.cpu() for k, v in substitute.state_dict().items()}, path)
            if world > 1:
                dist.barrier()
    torch.manual_seed(cfg.train.seed)  # same adapter init whether or not demo substitutes just trained
    base, teacher = dsclora.load_pair(weights["base"], weights.get("teacher"), scale)
    if cfg.model.teacher_ensemble > 1:  # the teacher's mean over flips/transposes (ensemble.py); the student stays one forward
        teacher = SelfEnsemble(teacher, cfg.model.teacher_ensemble).eval()
    upcycle = [upcycle_region(np.asarray(hr), cfg.data.upcycle_side) for hr in train_set.hr] \
        if cfg.data.upcycle_share else None
    targets, upcycle_targets, only_targets, cache_info = None, None, None, {}
    if cfg.teacher_cache.enabled:  # the teacher's SR of every whole input, once (every rank builds its share)
        build_device = device if cfg.teacher_cache.build_device == "auto" and torch.cuda.is_available() else \
            torch.device("cuda" if cfg.teacher_cache.build_device == "cuda" else "cpu")
        caches = []
        # the teacher-only images' LR are made as the training images' are: the same "lr" entries (one per input)
        lr_inputs = [np.asarray(a) for a in train_set.lr + (only_set.lr if only_set is not None else [])]
        for kind, inputs in (("lr", lr_inputs), ("upcycle", upcycle)):
            if inputs is None:
                continue
            tc = TeacherCache(cfg.teacher_cache.dir or Path(cache) / "teacher", CacheSpec(
                teacher=weights_digest(teacher), architecture=_architecture(teacher), compute=cfg.teacher_cache.compute,
                dtype=cfg.teacher_cache.dtype, tile=cfg.teacher_cache.tile, pad=cfg.teacher_cache.pad, scale=scale,
                downscaler="matlab_bicubic_uint8" if kind == "lr" else "none", lr_mode=cfg.data.lr_mode, kind=kind))
            built = tc.build(teacher, inputs, device=build_device, rank=rank, world=world,
                             progress=cfg.train.progress and main_proc, desc=f"teacher cache ({kind})")
            if world > 1:
                dist.barrier()
            say(f"teacher cache ({kind}): {len(inputs)} entries in {tc.root} ({built} built here on {build_device})")
            caches.append((kind, tc, inputs))
            cache_info[kind] = {"folder": str(tc.root), "spec": tc.spec.digest(), "entries": len(inputs)}
        for kind, tc, inputs in caches:
            if kind == "lr":
                read = tc.read(inputs)
                targets, only_targets = read[:len(train_set.lr)], (read[len(train_set.lr):] if only_set else None)
            else:
                upcycle_targets = tc.read(inputs)
    student = dsclora.build_student(base, lora).to(device)
    base, teacher = base.to(device).requires_grad_(False), teacher.to(device).requires_grad_(False)
    if device.type == "cuda" and cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)  # in place (Module.to returns self)
        teacher.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    say(f"student: {sum(p.numel() for p in params):,} trainable {'adapter ' if lora is not None else ''}parameters"
        f"{' (full fine-tuning)' if lora is None else ''}; teacher "
        f"{weights.get('teacher', 'base')}; base {weights['base']}")
    # EMA of the weights (validation and export use it); the first update copies the start weights
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema)) if cfg.train.ema else None
    if ema is not None:
        ema.update_parameters(student)
    model = DistributedDataParallel(student, broadcast_buffers=False) if world > 1 else student

    # ------------------------------------------------------------------ loss (dsclora.py)
    dataset = PatchDataset(train_set, cfg.data.patch, cfg.train.seed, augment=cfg.data.augment, targets=targets,
                           upcycle=upcycle, upcycle_targets=upcycle_targets, share=cfg.data.upcycle_share,
                           batch=cfg.data.batch, invert=cfg.data.invert, teacher_only=only_set,
                           teacher_only_targets=only_targets, teacher_only_share=cfg.data.teacher_only_share)
    step0 = dataset  # step 0's global batch, the same on every rank
    tap_weights, w_aff, start_aff = dsclora.affinity_tap_weights(
        base, teacher, cfg.loss, to_float(torch.stack([step0[i][0] for i in range(cfg.data.batch)]), device))
    if start_aff:
        say("affinity per tap at the start (base vs teacher): "
            + ", ".join(f"{k} {v:.3g}" for k, v in start_aff.items()))
    distiller = dsclora.make_loss(model, teacher, cfg.loss, tap_weights, w_aff, cached=cfg.teacher_cache.enabled)
    forward = torch.compile(distiller.__call__) if cfg.train.compile else distiller
    in_use = [k for k, w in (("rec", cfg.loss.w_rec), ("out", cfg.loss.w_out), ("aff", w_aff)) if w]

    # ------------------------------------------------------------------ optimizer, schedule, resume
    opt = torch.optim.Adam(params, lr=cfg.train.lr, betas=(cfg.train.betas[0], cfg.train.betas[1]),
                           weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.train))
    start = 0
    best: dict[str, Any] = {"psnr": -math.inf, "step": 0, "params": None}  # the best validation step
    if state is not None:
        ckpt.load_trainable_state(student, state["params"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        start, best = state["step"], state["best"]
        say(f"resumed {run} at step {start}")
    if main_proc:
        (run / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
        ckpt.write_json(run / "provenance.json", ckpt.provenance(
            seed=cfg.train.seed, data={"train": train_set.refs, "val": val_refs,
                                       **({"teacher_only": only_set.refs} if only_set is not None else {})},
            weights=weights,
            extra={"args": argv, "world_size": world, "device": str(device), "resumed_from_step": start,
                   "teacher_cache": cache_info}))
    log = report.MetricsLog(run / "metrics.jsonl", truncate_after=start if resume else -1, enabled=main_proc)

    saved: dict[str, int | None] = {"step": start if state is not None else None}  # what checkpoint.pt holds

    def checkpoint(step: int) -> None:
        saved["step"] = step
        if main_proc:
            ckpt.save_checkpoint(run / "checkpoint.pt", step=step, params=ckpt.trainable_state(student),
                                 optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=ckpt.rng_state(),
                                 ema=ema.state_dict() if ema is not None else None, best=best)

    if val_set is not None and start == 0 and main_proc:
        ref = {"val_bicubic": score(lambda lr: imresize_matlab(lr, scale), zip(
            val_set.refs, map(np.asarray, val_set.hr), map(np.array, val_set.lr)), scale, ["psnr_y"])["mean"]["psnr_y"],
            "val_base": mean_psnr(base, val_set), "val_teacher": mean_psnr(teacher, val_set)}
        log.write({"step": 0, **ref})
        say(f"validation Y-PSNR: bicubic {ref['val_bicubic']:.3f} dB, base {ref['val_base']:.3f} dB, "
            f"teacher {ref['val_teacher']:.3f} dB")

    # ------------------------------------------------------------------ loop
    stop = {"signal": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, checkpoint, exit (main() restores them)
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=rank_batches(start, cfg.train.steps, cfg.data.batch, rank, world),
        num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.data.workers else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.amp)
    bar = report.Progress(start, cfg.train.steps, enabled=main_proc, bar=cfg.train.progress)
    sums, count, t_log = torch.zeros(4, device=device), 0, time.time()  # loss, rec, out, aff since the last log
    t_start, step, exit_code, timeout = time.time(), start, 0, False
    for step, batch in enumerate(loader, start + 1):  # `step` counts completed steps
        lr, hr = to_float(batch[0], device), to_float(batch[1], device)
        target = to_float(batch[2], device) if len(batch) > 2 and batch[2].numel() else None
        real = batch[3].to(device) if len(batch) > 3 and not bool(batch[3].all()) else None
        if device.type == "cuda" and cfg.train.channels_last:
            lr = lr.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss, parts, _ = forward(lr, hr, step=step - 1, target=target, real=real)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over ranks here
        if cfg.train.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(student)
        sums += torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in ("rec", "out", "aff")])
        count += 1
        bar.update(1)
        last = step == cfg.train.steps
        timeout = bool(cfg.train.time_limit and time.time() - t_start > cfg.train.time_limit)
        do_val = val_set is not None and ((cfg.train.val_every and step % cfg.train.val_every == 0) or last or timeout)
        do_ckpt = (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0) or last
        interrupted = bool(stop["signal"] or (cfg.train.stop_after and step - start >= cfg.train.stop_after))
        if world > 1:  # every rank stops at the same step
            flags = torch.tensor([float(interrupted), float(timeout)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            interrupted, timeout = bool(flags[0]), bool(flags[1])
        if step % cfg.train.log_every == 0 or last or do_val or do_ckpt or interrupted or timeout:
            if world > 1:
                dist.all_reduce(sums)
                sums /= world
            mean = dict(zip(("loss", "rec", "out", "aff"), (sums / count).tolist()))  # the global batch's mean
            if not all(math.isfinite(v) for v in mean.values()):
                kept = (f"the last good checkpoint (step {saved['step']}) is kept in {run / 'checkpoint.pt'}; resume "
                        f"it with --resume {run} and a lower --train.lr" if saved["step"] is not None else
                        "no checkpoint was written yet; start again with a lower --train.lr")
                say(f"step {step}: loss is {mean['loss']} (" + ", ".join(f"{k} {mean[k]}" for k in in_use)
                    + f"): stopping; {kept}, or check the data.")
                exit_code = 3
                break
            log.write({"step": step, **mean, "lr": sched.get_last_lr()[0], "it_s": count / (time.time() - t_log)})
            bar.show(loss=f"{mean['loss']:.4f}", **{k: f"{mean[k]:.2e}" if k == "aff" else f"{mean[k]:.4f}"
                                                    for k in in_use}, lr=f"{sched.get_last_lr()[0]:.1e}")
            sums, count, t_log = torch.zeros(4, device=device), 0, time.time()
        if do_val and main_proc:
            assert val_set is not None  # do_val implies a validation set
            value = mean_psnr(ema.module if ema is not None else student, val_set)
            if value > best["psnr"]:
                best = {"psnr": value, "step": step, "params": ckpt.trainable_state(
                    ema.module if ema is not None else student)}
            log.write({"step": step, "val_psnr": value, "best_psnr": best["psnr"], "best_step": best["step"]})
            bar.write(f"step {step}: validation Y-PSNR {value:.3f} dB (best {best['psnr']:.3f} at step {best['step']})")
        if do_ckpt or interrupted:
            checkpoint(step)
        if interrupted:
            why = f"signal {stop['signal']}" if stop["signal"] else f"train.stop_after={cfg.train.stop_after}"
            bar.write(f"stopped at step {step} ({why}); checkpoint written. Continue with: "
                      f"python examples/span_sr/train.py --resume {run}")
            exit_code = 128 + stop["signal"] if stop["signal"] else 0
            break
        if timeout:
            bar.write(f"time limit {cfg.train.time_limit:.0f}s reached at step {step}; finishing the run there")
            checkpoint(step)
            break
    bar.close()
    for sig in (signal.SIGINT, signal.SIGTERM):  # from here on (export, final evaluation) an interrupt stops at once
        signal.signal(sig, _interrupt)
    finished = not exit_code and (step >= cfg.train.steps or timeout)

    # ------------------------------------------------------------------ best step, export, report (rank 0)
    if finished and main_proc:
        final = ema.module if ema is not None else student
        if best["params"] is not None:
            ckpt.load_trainable_state(student, best["params"])
            final = student
            say(f"using the best validation adapter: step {best['step']}, {best['psnr']:.3f} dB")
        final = final.to(memory_format=torch.contiguous_format)
        if lora is not None:  # full fine-tuning has no adapter: merged.* are its weights
            convlora.save_adapter(final, run / "adapter.safetensors",
                                  metadata={"best_step": best["step"], "config": cfg.to_dict()})
        merged = dsclora.deploy(final)
        for name in ("merged.safetensors", "merged.pth"):  # plain SPAN, official keys (atomic writes)
            convlora.save_state_dict(merged.state_dict(), run / name)
        models = {"base": base, "teacher": teacher, "student": merged.to(device)}
        sets = {"val (held out)" if not cfg.data.val else "val": val_set} if val_set is not None else {}
        sets.update({name: ImageSet.load(found, scale, cache_dir=cache) for name, found in tests.items()})
        results = {}
        for name, images in sets.items():
            assert images is not None
            bicubic = score(lambda lr: imresize_matlab(lr, scale), zip(
                images.refs, map(np.asarray, images.hr), map(np.array, images.lr)), scale, ["psnr_y"])
            results[name] = {"bicubic": bicubic["mean"]["psnr_y"], **{n: mean_psnr(m, images) for n, m in models.items()}}
        ckpt.write_json(run / "results.json", {"y_psnr_db": results, "best_step": best["step"], "steps": step})
        say("\n" + report.results_table(results, scale))
        report.plot_curves(log.read(), run / "curves.png")
        if val_set is not None:
            strip = report.comparison_strip(np.array(val_set.lr[0]), np.asarray(val_set.hr[0]),
                                            {"base": base, "student": models["student"], "teacher": teacher})
            write_image(run / "comparison.png", strip)
        say(f"\noutputs in {run}/: " + ", ".join(sorted(p.name for p in run.iterdir() if p.is_file()))
            + f"\nmerged.pth is a plain SPAN with the official keys; try it:\n  python examples/span_sr/upscale.py "
            f"--weights {run / 'merged.pth'} --input IMAGE --output OUT_DIR")

    # ------------------------------------------------------------------ teardown
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's exports
        del forward, distiller, model  # the DDP reducer holds the process group: free it before destroying that
        dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
