"""GPU check: do the exercises run on this CUDA machine, and how fast is exercise 1.3's default?

Needs no download: CIFAR-shaped data is synthetic uint8 with random labels (speed does not depend
on pixel values), MNIST-shaped data is written with tests/synthetic.py's writers, both into a
temp dir. In about 2-5 minutes on one GPU it measures and prints one table (and writes it as JSON):

1. smoke runs: exercises 1.1, 1.2 (one study depth: a plain and a residual cell), 1.3, 2.2 and 2.3
   part 1 (on 1.3's checkpoint), each a subprocess with tiny settings and W&B off; each must exit 0.
2. exercise 1.3's default (ResNet-9 layout, widths [128, 256, 512], depth 1, batch 512, bf16
   autocast, channels_last) on 50,000 images, fed as training.train feeds it (uint8 data on the
   GPU, crop + flip on whole batches there): images/s and epoch time, the median of >= 3 epochs
   after a warm-up epoch (which absorbs torch.compile and cuDNN autotuning), timed with CUDA
   events; torch.compile off and on; peak GPU memory.
3. model FLOPs utilisation: FLOPs counted from the layers (forward hooks on every Conv2d and
   Linear: multiply-accumulates x 2 = forward FLOPs; x 3 for forward + backward; BatchNorm,
   ReLU, pooling and the optimizer are not counted), against the GPU's dense bf16 peak (PEAK_BF16;
   an unknown GPU gets no MFU).
4. the same model and step fed by a tuned torchvision pipeline (bench/bench_cifar.py's: a Dataset
   over the same uint8 images, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
   Normalize; DataLoader with one worker per core, pin_memory, persistent_workers): its images/s
   (last of the same number of epochs) and our ratio to it.
5. with 2 GPUs: exercise 1.3 trained by the script itself on 1 GPU and through torchrun on 2 (the
   same global batch), samples/s of each (median of epochs 2..), and the scaling efficiency;
   skipped, with the reason, on a machine with one GPU.

Targets, printed next to the figures (reported, not enforced): >= 50,000 images/s without
compile, >= 80,000 with compile, >= 3x the DataLoader pipeline. Exit status 0 when every smoke run
and every measurement ran, 1 otherwise, 2 when there is no CUDA device.

    python bench/gpu_check.py                          # on a CUDA machine; table -> runs/gpu_check.json
    python bench/gpu_check.py --out /tmp/check.json
    python bench/gpu_check.py --device cpu --tiny      # seconds-long CPU dry run of every step (tests)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests'), HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGETS = {'no_compile': 50_000, 'compile': 80_000, 'vs_dataloader': 3.0}  # images/s, images/s, ratio
# Dense (no sparsity) bf16 tensor-core peak, TFLOPS, from NVIDIA's data sheets; matched in this
# order against torch.cuda.get_device_name(). Anything else: MFU n/a.
PEAK_BF16 = [('H200', 989.0), ('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.0),  # H100 SXM
             ('A100', 312.0), ('L40S', 362.0), ('L4', 121.0)]
SIZES = {  # full: exercise 1.3's default on CIFAR-10's 50,000; tiny: the CPU dry run
    'full': dict(n=50_000, widths=[128, 256, 512], batch_size=512, timed_epochs=3, smoke_subset=1024),
    'tiny': dict(n=256, widths=[8, 16, 16], batch_size=64, timed_epochs=3, smoke_subset=64),
}
SMOKE_TIMEOUT = 300  # seconds per smoke run


# ---------------------------------------------------------------------------------------------
# Data: synthetic, in the real on-disk formats

def write_data(data_dir: str, n: int, n_val: int) -> None:
    from bench_cifar import CLASSES
    from synthetic import write_cifar10, write_mnist
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n + n_val, 3, 32, 32), dtype=np.uint8)  # (N, C, H, W), random labels
    y = rng.integers(0, 10, n + n_val)
    write_cifar10(data_dir, {'train': (x, y), 'test': (x[:n_val], y[:n_val])}, CLASSES)
    write_mnist(data_dir, 'MNIST', n_train=300, n_test=100)


# ---------------------------------------------------------------------------------------------
# 1. Smoke runs: the scripts as a user runs them

def smoke_runs(tmp: str, device: str, size: dict) -> list[dict]:
    common = ['--wandb', 'off', '--device', device, '--data_dir', os.path.join(tmp, 'data'),
              '--runs_dir', os.path.join(tmp, 'smoke'), '--epochs', '1']
    widths = [] if size is SIZES['full'] else ['--widths', str(size['widths']).replace(' ', '')]
    runs = {
        '1.1': ['exercise_1_1.py', '--max_steps', '5', '--run_name', 'smoke'],
        '1.2 study cell': ['exercise_1_2.py', '--part', 'study', '--depths', '[2]', '--study_width', '64',
                           '--study_epochs', '1', '--max_steps', '5'],
        '1.3': ['exercise_1_3.py', '--dataset', 'cifar10', '--subset', str(size['smoke_subset']), '--max_steps', '3',
                '--run_name', 'smoke', *widths],
        '2.2': ['exercise_2_2.py', '--max_steps', '3', '--finetune_epochs', '1', '--finetune_canvases', '40',
                '--test_canvases', '8', '--val_canvases', '4', '--figure_canvases', '2', '--run_name', 'smoke'],
    }
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'WANDB_MODE': 'disabled'}
    if device == 'cpu':
        env['OMP_NUM_THREADS'] = '1'  # the dry run: the runs share a small machine

    def start(args: list[str]) -> tuple[subprocess.Popen, float]:
        return subprocess.Popen([sys.executable, *args, *common], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE), time.perf_counter()

    def finish(name: str, proc: subprocess.Popen, t0: float) -> dict:
        try:
            out, err = proc.communicate(timeout=SMOKE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f'\ntimed out after {SMOKE_TIMEOUT} s'
        lines = [line for line in err.splitlines() if line.strip()]
        row = {'name': name, 'exit_code': proc.returncode, 'seconds': round(time.perf_counter() - t0, 1),
               'error': '' if proc.returncode == 0 else (lines[-1] if lines else out[-300:])}
        print(f"  smoke {name}: exit {proc.returncode} in {row['seconds']} s {row['error']}", flush=True)
        return row

    started = {name: start(args) for name, args in runs.items()}  # independent: all at once
    rows = [finish(name, *started[name]) for name in runs]
    best = os.path.join(tmp, 'smoke', 'exercise_1_3', 'smoke', 'checkpoints', 'best.pt')
    rows.append(finish('2.3 part 1', *start(['exercise_2_3.py', '--part', 'cnn', '--checkpoint', best, '--subset', '64',
                                             '--faithfulness_images', '16', '--faithfulness_steps', '4',
                                             '--per_class', '[1,1]', '--batch_size', '32', '--run_name', 'smoke'])))
    return rows


# ---------------------------------------------------------------------------------------------
# 2-3. Our pipeline: the model and step of training.train, timed per epoch

def flops_per_image(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> dict:
    """Multiply-accumulates of every Conv2d and Linear in one forward of one image, from hooks."""
    macs = {'conv': 0, 'linear': 0}

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):  # each output value: in_channels/groups * kh * kw MACs
            kh, kw = module.kernel_size
            macs['conv'] += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            macs['linear'] += output.numel() * module.in_features
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape, device=device))  # (1, C, H, W): counts are per image
    model.train(was_training)
    for h in handles:
        h.remove()
    forward = 2 * (macs['conv'] + macs['linear'])
    return {'macs_conv': macs['conv'], 'macs_linear': macs['linear'], 'forward_flops': forward,
            'train_flops': 3 * forward,  # backward ~ 2x forward (grads of inputs and of weights)
            'how': 'Conv2d/Linear multiply-accumulates from forward hooks, x2 = forward FLOPs, x3 = forward + '
                   'backward; BatchNorm, ReLU, pooling, loss and optimizer not counted'}


class EpochTimer:
    """Seconds of a block: CUDA events on the GPU (after a synchronize, so the block starts idle),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def time_ours(config: dict, data, compile: bool, timed_epochs: int, tiny: bool) -> dict:
    """Exercise 1.3's model trained one warm-up epoch plus `timed_epochs`, with training.train's
    data path (Split.batches: a seeded permutation, on-device crop + flip) and step (bf16 autocast
    and channels_last as device.use_amp/memory_format decide, cross-entropy, zero_grad, backward,
    optimizer and scheduler step). Returns per-epoch seconds, images/s, peak memory."""
    from bench_cifar import step
    from exercise_1_3 import build_model
    from device import memory_format, use_amp
    from training import make_optimizer, make_scheduler
    device = data.train.x.device
    torch.manual_seed(config['seed'])
    model = build_model(config, data)
    mf, amp = memory_format(device, model, config), use_amp(device, config)
    if device.type == 'cuda' and mf == torch.channels_last:
        torch.backends.cudnn.benchmark = True  # as training.train
    model.to(device=device, memory_format=mf).train()
    n, bs = len(data.train), config['batch_size']
    epochs = 1 + timed_epochs
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, epochs * math.ceil(n / bs))
    # the dry run compiles with the eager backend: dynamo traces the step, no C++ toolchain needed
    forward = torch.compile(model, **({'backend': 'eager'} if tiny else {})) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    generator = torch.Generator().manual_seed(config['seed'])
    augment_generator = torch.Generator(device=device).manual_seed(config['seed'])
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        with EpochTimer(device) as timer:
            for x, y in data.train.batches(bs, order, generator=augment_generator):
                loss = step(forward, x.contiguous(memory_format=mf), y, optimizer, scheduler, autocast,
                            config['label_smoothing'])
        seconds.append(timer.seconds)
        print(f"  ours, compile {'on' if compile else 'off'}: epoch {len(seconds)}/{epochs} {timer.seconds:.3f} s "
              f"({n / timer.seconds:,.0f} images/s), loss {loss.item():.3f}", flush=True)
    median = statistics.median(seconds[1:])
    return {'epoch_seconds': seconds, 'warmup_seconds': seconds[0], 'median_epoch_seconds': median,
            'images_per_second': n / median, 'final_loss': loss.item(), 'amp_bf16': amp,
            'channels_last': mf == torch.channels_last,
            'peak_memory_mib': torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda' else None}


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != 'cuda':
        return 'CPU', None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16 if key in name), None)


# ---------------------------------------------------------------------------------------------
# 5. Two GPUs: the script itself on 1 GPU and through torchrun on 2

def ddp_scaling(tmp: str, device: str, size: dict, epochs: int) -> dict:
    """samples/s of exercise 1.3 (training.train's own figure, validation excluded), median of
    epochs 2.., on 1 process and on 2 through torchrun; efficiency = rate(2) / (2 rate(1))."""
    import checkpoint
    args = ['exercise_1_3.py', '--dataset', 'cifar10', '--data_dir', os.path.join(tmp, 'data'), '--device', device,
            '--epochs', str(epochs), '--wandb', 'off', '--runs_dir', os.path.join(tmp, 'ddp'),
            '--widths', str(size['widths']).replace(' ', ''), '--batch_size', str(size['batch_size'])]
    env = {**os.environ, 'MPLBACKEND': 'Agg', **({'OMP_NUM_THREADS': '1'} if device == 'cpu' else {})}
    rates = {}
    for world in (1, 2):
        launcher = [] if world == 1 else ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
        result = subprocess.run([sys.executable, *launcher, *args, '--run_name', f'world{world}'], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=SMOKE_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"{world} process(es) exited {result.returncode}: "
                               f"{(result.stderr.strip().splitlines() or [''])[-1]}")
        history = checkpoint.load(os.path.join(tmp, 'ddp', 'exercise_1_3', f'world{world}', 'checkpoints',
                                               'last.pt')).history
        rates[world] = statistics.median(h['train/samples_per_second'] for h in history[1:])
        print(f"  exercise_1_3.py on {world} process(es): {rates[world]:,.0f} samples/s", flush=True)
    return {'samples_per_second_1': rates[1], 'samples_per_second_2': rates[2],
            'scaling_efficiency': rates[2] / (2 * rates[1])}


# ---------------------------------------------------------------------------------------------
# The table

def row(name: str, value, unit: str = '', target: str = '', note: str = '') -> dict:
    return {'name': name, 'value': value, 'unit': unit, 'target': target, 'note': note}


def fmt(value) -> str:
    if value is None:
        return 'n/a'
    if isinstance(value, float):
        return f'{value:,.0f}' if abs(value) >= 100 else f'{value:.3g}'
    return f'{value:,}' if isinstance(value, int) else str(value)


def verdict(value: float, goal: float, tiny: bool) -> str:
    if tiny:
        return f'>= {goal:,g} (full run only)'
    return f">= {goal:,g}: {'met' if value >= goal else 'MISSED'}"


def print_table(title: str, rows: list[dict]) -> None:
    w = max(len(r['name']) for r in rows)
    v = max(len(fmt(r['value'])) for r in rows)
    print(f"\n{title}")
    for r in rows:
        print(f"  {r['name']:<{w}}  {fmt(r['value']):>{v}} {r['unit']:<9} {r['target']:<28} {r['note']}")


# ---------------------------------------------------------------------------------------------

class Sections:
    """The check's table rows, its problems and its JSON report, filled section by section."""

    def __init__(self, gpu: str, tiny: bool):
        self.rows: list = []
        self.problems: list[str] = []
        self.report: dict = {'device': gpu, 'torch': torch.__version__, 'dry_run': tiny}

    def measure(self, what: str, fn, *a):
        """One section; a failure is recorded and reported, and the other sections still run."""
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - a failed section is a finding, not a crash
            self.problems.append(f'{what}: {type(e).__name__}: {e}')
            print(f"  {what} FAILED: {type(e).__name__}: {e}", flush=True)
            return None


def parse(argv: list[str] | None) -> argparse.Namespace | None:
    """The command line, or None (after one line on stderr) when this machine cannot run it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda', help="cuda (the check), or cpu with --tiny (a dry run)")
    p.add_argument('--tiny', action='store_true', help='tiny sizes: a seconds-long dry run of every step')
    p.add_argument('--ddp', action='store_true', help='with --device cpu: run the 2-process row on the CPU (gloo)')
    p.add_argument('--out', default=os.path.join('runs', 'gpu_check.json'), help='where to write the table as JSON')
    args = p.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}); run it on a CUDA machine, "
              f"or `python bench/gpu_check.py --device cpu --tiny` for a dry run", file=sys.stderr)
        return None
    if args.device not in ('cuda', 'cpu') or (args.device == 'cpu' and not args.tiny):
        print("gpu_check: --device is cuda, or cpu together with --tiny (a dry run)", file=sys.stderr)
        return None
    return args


def smoke_section(out: Sections, tmp: str, device: str, size: dict) -> None:
    print("1. smoke runs", flush=True)
    smoke = smoke_runs(tmp, device, size)
    out.report['smoke'] = smoke
    for s in smoke:
        out.rows.append(row(f"smoke {s['name']}", 'ok' if s['exit_code'] == 0 else f"exit {s['exit_code']}",
                            '', 'exit 0', f"{s['seconds']} s {s['error']}".strip()))
        if s['exit_code'] != 0:
            out.problems.append(f"smoke {s['name']}: exit {s['exit_code']}: {s['error']}")


def training_section(out: Sections, config: dict, data, device: torch.device, size: dict, tiny: bool,
                     gpu: str, peak: float | None) -> dict:
    """Exercise 1.3's model timed with and without torch.compile, its FLOPs and MFU. Returns {compile: result}."""
    print(f"2. exercise 1.3's model on {len(data.train):,} images, batch {config['batch_size']}, "
          f"widths {config['widths']}", flush=True)
    ours = {c: out.measure(f"ours, compile {'on' if c else 'off'}", time_ours, config, data, c,
                           size['timed_epochs'], tiny) for c in (False, True)}
    from exercise_1_3 import build_model
    flops = out.measure('FLOP count', flops_per_image, build_model(config, data).to(device), data.shape, device)
    out.report['flops'] = flops
    for c, r in ours.items():
        if r is None:
            continue
        key = 'compile' if c else 'no_compile'
        label = f"ours, compile {'on' if c else 'off'}{' (eager backend)' if tiny and c else ''}"
        out.rows.append(row(f'{label}: images/s', r['images_per_second'], 'img/s', verdict(r['images_per_second'],
                            TARGETS[key], tiny), f"median of {size['timed_epochs']} epochs after warm-up"))
        out.rows.append(row(f'{label}: epoch time', r['median_epoch_seconds'], 's', '',
                            f"warm-up epoch (compile, autotune) {r['warmup_seconds']:.2f} s"))
        out.rows.append(row(f'{label}: peak GPU memory', r['peak_memory_mib'], 'MiB', '',
                            f"bf16 {r['amp_bf16']}, channels_last {r['channels_last']}"))
        if flops:
            achieved = r['images_per_second'] * flops['train_flops'] / 1e12
            out.rows.append(row(f'{label}: model TFLOPS', achieved, 'TFLOPS', '',
                                f"{flops['forward_flops'] / 1e9:.3f} GFLOP forward per image, x3 for training"))
            out.rows.append(row(f'{label}: MFU', None if peak is None else 100 * achieved / peak, '%', '',
                                f'of {peak:g} TFLOPS dense bf16 ({gpu})' if peak else f'no bf16 peak known for {gpu}'))
    out.report['ours'] = {('compile' if c else 'no_compile'): r for c, r in ours.items()}
    return ours


def dataloader_section(out: Sections, config: dict, tmp: str, ours: dict, tiny: bool) -> None:
    print("4. the torchvision DataLoader pipeline, same model and step", flush=True)
    from bench_cifar import bench_torchvision
    workers = os.cpu_count() or 1
    loader = out.measure('DataLoader', bench_torchvision, {**config, 'compile': False}, os.path.join(tmp, 'data'),
                         workers)
    if not loader:
        return
    rate = loader[0]
    out.report['dataloader'] = {'images_per_second': rate, 'workers': workers, 'peak_memory': loader[1]}
    out.rows.append(row('DataLoader: images/s', rate, 'img/s', '',
                        f"{workers} workers, pin_memory, persistent; last of {config['epochs']} epochs"))
    if ours[False]:
        ratio = ours[False]['images_per_second'] / rate
        out.rows.append(row('ours / DataLoader (compile off)', ratio, 'x', verdict(ratio, TARGETS['vs_dataloader'],
                            tiny), 'same model, step, bf16 and channels_last'))


def ddp_section(out: Sections, tmp: str, device: torch.device, size: dict, cpu_ddp: bool) -> None:
    print("5. two GPUs", flush=True)
    gpus = torch.cuda.device_count() if device.type == 'cuda' else 0
    if gpus >= 2 or (cpu_ddp and device.type == 'cpu'):
        ddp = out.measure('DDP', ddp_scaling, tmp, device.type, size, 1 + size['timed_epochs'])
        if ddp:
            out.report['ddp'] = ddp
            out.rows.append(row('DDP 2 processes: samples/s', ddp['samples_per_second_2'], 'img/s', '',
                                f"1 process: {ddp['samples_per_second_1']:,.0f} (exercise_1_3.py, torchrun)"))
            out.rows.append(row('DDP scaling efficiency', 100 * ddp['scaling_efficiency'], '%', '',
                                'rate(2) / (2 x rate(1)), same global batch'))
    else:
        reason = f'{gpus} CUDA device(s); needs 2' if device.type == 'cuda' else 'dry run without --ddp'
        out.report['ddp'] = {'skipped': reason}
        out.rows.append(row('DDP 2 processes', 'skipped', '', '', reason))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args is None:
        return 2
    from dataset import load_data
    from exercise_1_3 import config as default_config
    tiny, size, device = args.tiny, SIZES['tiny' if args.tiny else 'full'], torch.device(args.device)
    gpu, peak = peak_tflops(device)
    started = time.perf_counter()
    print(f"gpu_check on {gpu}, torch {torch.__version__}{' (dry run, tiny sizes)' if tiny else ''}", flush=True)
    out = Sections(gpu, tiny)
    with tempfile.TemporaryDirectory() as tmp:
        n_val = max(1, round(0.02 * size['n']))  # a small val split; train holds exactly n
        write_data(os.path.join(tmp, 'data'), size['n'], n_val)
        smoke_section(out, tmp, args.device, size)
        config = {**default_config, 'dataset': 'cifar10', 'data_dir': os.path.join(tmp, 'data'),
                  'runs_dir': os.path.join(tmp, 'runs'), 'wandb': 'off', 'device': args.device,
                  'widths': size['widths'], 'batch_size': size['batch_size'], 'val_split': n_val / (size['n'] + n_val),
                  'epochs': 1 + size['timed_epochs'], 'run_name': 'dataloader'}
        data = load_data(config, device)
        ours = training_section(out, config, data, device, size, tiny, gpu, peak)
        dataloader_section(out, config, tmp, ours, tiny)
        ddp_section(out, tmp, device, size, args.ddp)

    report, problems = out.report, out.problems
    report['rows'], report['problems'] = out.rows, problems
    report['seconds'] = round(time.perf_counter() - started, 1)
    print_table(f"gpu_check: {gpu}, torch {torch.__version__}, {report['seconds']} s"
                f"{' (DRY RUN: tiny sizes, figures mean nothing)' if tiny else ''}", out.rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from files import write_json
    write_json(args.out, json.loads(json.dumps(report, default=str)))  # atomic, like every file a run writes
    print(f"wrote {args.out}" + (f"; {len(problems)} problem(s):\n  " + '\n  '.join(problems) if problems else ''))
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
