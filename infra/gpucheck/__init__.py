"""Every CUDA path of sr-cloud in one short check: ``./dev gpu-check``, or
``python -m infra.gpucheck`` (what ``sr cloud gpu-check`` runs on a VM).

On a machine with CUDA it runs, in under 8 minutes on one GPU, the steps of ``STEPS``
(``--list`` prints them with their time budgets) and prints one Markdown table — device,
driver, torch/CUDA versions and every figure — which it also writes to ``--out`` (and a
``.json`` beside it). The exit code is 1 if any path failed, else 0. On a machine
without CUDA it prints one line and exits 0 without running anything.

- Upscaler, full ESRGAN RRDBNet x4 and the compact generator (``srvgg_compact``,
  ``realesr_general``): fp32 vs fp16 vs bf16 (bf16 only from compute capability 8.0:
  V100 is sm_70 and has no bf16 tensor cores, although
  ``torch.cuda.is_bf16_supported()`` says True there through emulation), output PSNR
  against fp32 (must be >= 45 dB), output Mpx/s, peak GPU memory
  (``torch.cuda.max_memory_allocated``), tiles per forward pass 1 vs 4 vs the automatic
  choice, channels_last on vs off — all through ``sr_core.Upscaler``'s own options, on
  the photographs in assets/images.
- ``sr upscale`` end to end against the bare model over the same batches of tiles (the
  floor) and the straightforward reference loop (``workloads.reference_loop``, also the reference
  of bench/bench_upscaler.py).
- ``sr train``: both stages, a few dozen steps, at the device's default precision, with
  DDP (``sr train``) and with DeepSpeed ZeRO-2 (``accelerate launch --config_file
  jobs/launch/deepspeed_zero2_8_gpus.yaml``); losses finite and (PSNR stage) falling,
  the loss scale logged, a SIGTERM checkpoint and ``--resume auto`` continuing. With
  >= 2 GPUs the same with 2 processes over NCCL, both ranks ending with equal weights.
- ``sr batch`` on a local Ray with one GPU actor over a few hundred small images against
  ``sr upscale`` on the same GPU, GPU utilisation sampled with nvidia-smi, and whether
  the actor's encoding keeps up with its model.
- JPEG encoding on the GPU (nvJPEG through ``torchvision.io``, or nvImageCodec) against
  the CPU encoder, and the CPU fallback where neither is installed (``jpeg-gpu``).
- ``torch.compile`` of the Upscaler's model against eager (``compile``; opt-in with
  ``--only compile``: its budget would take the default run past 8 minutes).

Every step runs in a process of its own (its peak memory is its own, a crash or a hang
fails that step alone) with a hard limit of ``--timeout-factor`` times its budget.

Weights: the models are built with their published shapes and random weights (seeded;
ESRGAN's scaled initialisation) unless ``--rrdb-model`` / ``--compact-model`` name real
files (e.g. Real-ESRGAN's ``RealESRGAN_x4plus.pth``, ``realesr-general-x4v3.pth``), and
the GAN stage's perceptual loss uses a random VGG19 unless ``--vgg-weights`` is given:
the same computation, so speed, memory and precision paths are what they are with real
weights; the PSNR against fp32 is measured on those weights' outputs.

UNTESTED FOR LACK OF HARDWARE: this project has had no GPU machine. Nothing here has
run under CUDA: not the CUDA timings, memory figures, the nvidia-smi sampler, NCCL, the
DeepSpeed fp16 engines, fp16/bf16 autocast on a GPU, nor the budgets (estimates from
the FLOP model, see docs/PERFORMANCE.md). What the tests run is ``--cpu-rehearsal``:
the same step code on CPU with tiny sizes (fp32 and CPU bf16, gloo, CPU Ray actors),
which proves the steps, the table and the exit code work, and nothing about GPUs; its
table says so in its title and first row.

Layout:

- ``runner.py``: the registry ``STEPS``, one process per step with its hard limit, the
  table at the end, the command line.
- ``steps_environment.py``, ``steps_upscale.py``, ``steps_train.py``, ``steps_batch.py``,
  ``steps_tensorrt.py``, ``steps_codecs.py``, ``steps_compile.py``: one module per group
  of steps, one function per step.
- ``context.py`` (sizes, the ``Context`` a step gets, models), ``processes.py`` (the
  commands a step starts), ``measure.py`` (timing, memory, nvidia-smi), ``table.py``
  (rows, the Markdown table, the exit code), ``workloads.py`` (photographs, the FLOP
  model, the reference loop; shared with bench/).

Adding a step:

1. Write ``def step_name(ctx: Context) -> Iterator[Row]`` in the ``steps_*`` module of
   its group (or a new ``steps_x.py``). It yields ``Row(step, case, figures, status)``
   rows; ``status`` is ``SUCCESS``, ``failed(why)``, ``"skipped: why"`` or
   ``UNAVAILABLE``. Sizes come from ``ctx.sizes`` (add a field to ``Sizes`` with its GPU
   value and its tiny ``REHEARSAL`` value), the device from ``ctx.device``; commands
   are started with ``processes.run_logged`` / ``start_child`` so that the step's time
   limit stops them. An exception fails the step with one row and the others still run.
2. Add one line to ``STEPS`` in ``runner.py``: name, budget in seconds on one
   V100-class GPU (the one-GPU total must stay within ``TOTAL_BUDGET_ONE_GPU_S``), what
   it checks, the function, ``min_gpus`` if it needs more than one, and ``opt_in=True``
   for a step that runs only when ``--only`` names it.
3. Test its pure parts and its CPU rehearsal in tests/test_gpu_check.py (the rehearsal
   test runs every step).
"""
