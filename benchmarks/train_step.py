"""Full fine-tuning step throughput and MFU: nemo_jax against HF transformers + PyTorch AdamW.

    .venv/bin/python benchmarks/train_step.py [--preset quarter] [--batch 2] [--seq 256] [--rounds 6] [--steps 2]
                                              [--jax-malloc tuned|default] [--torch-malloc default|tuned] [--scan-unroll N]
                                              [--also-jax OPTIONS] [--torch-compile] [--json OUT]

Same model (a NeMo-shaped decoder, fp32), same weights, same batch, same loss (mean next-token NLL
over all B*T tokens) and same optimizer (AdamW, b=(0.9, 0.95), eps 1e-8, no weight decay,
global-norm clipping at 1.0), in the same run, on the CPU this runs on:

    nemo_jax   train_loop.train_step (value_and_grad over the flax model, chunked-loss custom VJP,
               train_loop.make_optimizer's fused clip + AdamW), jitted with the state donated, in a
               process with the glibc malloc settings of nemo_jax/runtime.py applied first: exactly
               what train.py runs
               (--jax-malloc default: glibc's defaults; --also-jax '--jax-malloc default' times both),
               with the layer loop fully unrolled (model.scan_unroll = n_layers, as the small demo
               configs run it) and so, as in train.py, each layer's weights, gradients and moments
               arrays of their own (model.unstack_layers: XLA:CPU neither copies each layer's weights
               out of stacked [L, ...] arrays nor concatenates its gradients back); --scan-unroll 1
               times the rolled scan over stacked params that is train.py's default for deep models.
    PyTorch    transformers.MistralForCausalLM (attn_implementation "sdpa": the fastest PyTorch
               path on CPU, ~5x eager here), F.cross_entropy on its logits, loss.backward(),
               clip_grad_norm_(1.0), torch.optim.AdamW(fused=True) (the fastest on CPU), eager
               (--torch-compile adds torch.compile); torch.set_num_threads(<cores>); glibc malloc defaults
               (--torch-malloc tuned gives it nemo_jax's settings).

Default config ("quarter"): NeMo's proportions at a quarter of its width (dim 1280, head_dim 128,
8 heads x 128 = 0.8 dim, GQA 4:1, FFN 2.8 x dim), 4 layers, the demo's 8192-token vocab; batch
2 x 256 tokens: ~245 GFLOP, ~1.6 s a step on 2 cores, matmul-dominated as NeMo's step is.

Each framework runs in its own worker process (no thread-pool contention between the two, each with
its default threading over all visible cores). The parent interleaves them round by round (the
order alternating): each round measures both frameworks' fp32 matmul peak (square and model-shaped
GEMMs, best of 3 x 4) and then times `--steps` train steps of each. The machine may be shared:
before every timed step and peak probe a worker waits (up to --wait-idle s) until the rest of the
machine is idle, and for every step it records the cores the rest of the machine used meanwhile
(/proc/stat minus its own CPU time), its own CPU-seconds and its page faults. Reported: best and
median step (and the median over "quiet" steps, when the rest used < --quiet cores), tokens/s and
model FLOP/s from the best step (ModelConfig.flops_per_token: 6 x matmul params + causal attention),
and MFU = model FLOP/s over the machine peak = the higher of the JAX and the PyTorch fp32 matmul
peaks measured in this run (MFU against each framework's own peak is printed as well).

Weights are created by nemo_jax and loaded into the HF model and the first step's losses compared
(they agree to ~1e-7: the two sides compute the same function); the losses after the last step are
printed too (both ran the same number of steps on the same batch).

Goals (issue 4): nemo_jax tokens/s >= 1.1 x PyTorch's; nemo_jax MFU >= 70% of the measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# NeMo's proportions at a quarter of its width: head_dim 128 with n_heads * head_dim = 0.8 * dim,
# GQA 4:1, FFN 2.8 x dim; the demo's 8192-token vocab.
PRESETS = {
    "quarter": dict(vocab_size=8192, dim=1280, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=3584),
    "small": dict(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536),
    "demo": dict(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=48, hidden_dim=384),
}
OPT = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0)


def n_cores() -> int:
    return len(os.sched_getaffinity(0))


def emit(obj) -> None:
    """A reply to the parent: one tagged JSON line (libraries may print other lines)."""
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def gemm_shapes(cfg: dict, tokens: int):
    """(m, k, n) of the matmul peak probes: square GEMMs and the model's own largest ones."""
    D, F, V = cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"]
    return [(1024, 1024, 1024), (2048, 2048, 2048), (tokens, D, F), (tokens, F, D), (tokens, D, V)]


_HZ = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU-seconds spent so far by everything on the machine (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _HZ  # all but idle and iowait (guest is inside user)


def wait_idle(max_wait: float, window: float = 0.3, threshold: float = 0.1) -> float:
    """Wait (at most max_wait s) until the other processes use < threshold cores over `window` s:
    each measurement then starts on a quiet machine, whichever framework's turn it is."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        b = machine_busy_s()
        time.sleep(window)
        if (machine_busy_s() - b) / window < threshold:
            break
    return time.perf_counter() - t0


def timed(fn) -> dict:
    """Wall seconds of fn(), our own CPU-seconds, and the cores the rest of the machine used meanwhile."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b, c, t = machine_busy_s(), time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    own = time.process_time() - c
    return {"s": wall, "cpu": own, "others": max(0.0, (machine_busy_s() - b - own) / wall),
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def best_rate(run, flops: float, reps: int, tries: int = 3, wait: float = 0.0) -> float:
    best = float("inf")
    for _ in range(tries):
        wait_idle(wait)
        t = time.perf_counter()
        for _ in range(reps):
            run()
        best = min(best, (time.perf_counter() - t) / reps)
    return flops / best


def serve(args, step, gemms: dict, losses: list) -> None:
    """The worker's command loop: `peak`, `steps N`, `quit` on stdin, one tagged JSON reply each."""
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "peak":
            emit({"peak": {f"{m}x{k}x{n}": best_rate(run, 2.0 * m * k * n, reps=4, wait=args.wait_idle)
                           for (m, k, n), run in gemms.items()}})
        elif cmd[0] == "steps":
            out = []
            for _ in range(int(cmd[1])):
                waited = wait_idle(args.wait_idle)
                out.append({**timed(step), "waited": waited})
            emit({"steps": out, "loss": losses[-1]})
        else:
            emit({"bye": True, "steps": len(losses)})
            return


# --- workers ----------------------------------------------------------------------------------------


def set_malloc(how: str) -> None:
    """`tuned`: nemo_jax.runtime.tune_malloc(), as train.py runs it (first thing, before JAX / torch
    exist); `default`: glibc's defaults."""
    if how == "tuned":
        sys.path.insert(0, str(ROOT))
        from nemo_jax.runtime import tune_malloc
        assert tune_malloc(), "the malloc tuning did not apply"


def jax_worker(args, cfg: dict, work: Path) -> None:
    set_malloc(args.jax_malloc)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import functools
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from nemo_jax import model as M
    from nemo_jax import train_loop as TL
    from nemo_jax.config import ModelConfig

    c = ModelConfig(max_seq_len=max(4096, args.seq), **cfg)
    tc = SimpleNamespace(steps=10**6, schedule="constant", warmup_steps=0, min_lr_ratio=0.1, **OPT)
    opt = TL.make_optimizer(tc)
    params = M.init_params(c, jax.random.key(args.seed))["params"]
    flat = {"/".join(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(work / "params.npz", **flat)
    data = np.load(work / "batch.npz")
    B, T = data["tokens"].shape
    batch = {"tokens": jnp.asarray(data["tokens"], jnp.int32), "targets": jnp.asarray(data["targets"], jnp.int32),
             "loss_mask": jnp.ones((B, T), jnp.float32), "segment_ids": jnp.ones((B, T), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
    spec = TL.StepSpec(c, None, "none", 1, args.loss_chunk, scan_unroll=args.scan_unroll)
    if spec.per_layer:  # the trainer's layout for an unrolled loop (trainer.StepSetup)
        params = M.unstack_layers(params)
    state = TL.init_state(params, opt, 0)
    del params
    step = jax.jit(functools.partial(TL.train_step, spec, opt), donate_argnums=(0,))
    t0 = time.perf_counter()
    step = step.lower(state, None, batch).compile()
    compile_s = time.perf_counter() - t0
    losses = []

    def one_step():
        nonlocal state
        state, metrics = step(state, None, batch)
        jax.block_until_ready((state, metrics))
        losses.append(float(metrics["loss"]))

    first = timed(one_step)
    emit({"ready": True, "first_loss": losses[0], "first_step_s": first["s"], "compile_s": compile_s,
          "version": f"jax {jax.__version__}", "devices": str(jax.devices())})

    mm = jax.jit(lambda a, b: a @ b)
    gemms = {}
    for m, k, n in gemm_shapes(cfg, B * T):
        a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
        mm(a, b).block_until_ready()
        gemms[(m, k, n)] = functools.partial(lambda a, b: mm(a, b).block_until_ready(), a, b)
    serve(args, one_step, gemms, losses)


def torch_worker(args, cfg: dict, work: Path) -> None:
    set_malloc(args.torch_malloc)
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    D, N, K, H, L = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["n_layers"]
    hf = transformers.MistralConfig(
        vocab_size=cfg["vocab_size"], hidden_size=D, intermediate_size=cfg["hidden_dim"], num_hidden_layers=L,
        num_attention_heads=N, num_key_value_heads=K, head_dim=H, max_position_embeddings=max(4096, args.seq),
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, sliding_window=None,
        attn_implementation=args.torch_attn)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(hf).float().train()
    # nemo_jax's weights, into HF's [out, in] layout (both use rotate-half RoPE: no permutation).
    p = np.load(work / "params.npz")
    sd = {"model.embed_tokens.weight": p["embed/embedding"], "model.norm.weight": p["final_norm/scale"],
          "lm_head.weight": p["lm_head/kernel"].T}
    for i in range(L):
        pre, lay = f"model.layers.{i}.", "layers/"
        sd[pre + "input_layernorm.weight"] = p[lay + "attention_norm/scale"][i]
        sd[pre + "post_attention_layernorm.weight"] = p[lay + "ffn_norm/scale"][i]
        for n in ("q", "k", "v"):
            sd[pre + f"self_attn.{n}_proj.weight"] = p[lay + f"attention/{n}/kernel"][i].reshape(D, -1).T
        sd[pre + "self_attn.o_proj.weight"] = p[lay + "attention/o/kernel"][i].reshape(N * H, D).T
        for n in ("gate", "up", "down"):
            sd[pre + f"mlp.{n}_proj.weight"] = p[lay + f"mlp/{n}/kernel"][i].T
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                                strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    fwd = torch.compile(model) if args.torch_compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"], fused=True)
    data = np.load(work / "batch.npz")
    x, y = torch.from_numpy(data["tokens"]).long(), torch.from_numpy(data["targets"]).long()
    losses = []

    def one_step():
        opt.zero_grad(set_to_none=True)
        logits = fwd(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["grad_clip"])
        opt.step()
        losses.append(loss.item())

    first = timed(one_step)
    emit({"ready": True, "first_loss": losses[0], "first_step_s": first["s"],
          "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
          "threads": torch.get_num_threads()})

    B, T = x.shape
    gemms = {}
    for m, k, n in gemm_shapes(cfg, B * T):
        g = torch.Generator().manual_seed(0)
        a, b, c = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.empty(m, n)
        torch.mm(a, b, out=c)
        gemms[(m, k, n)] = (lambda a, b, c: lambda: torch.mm(a, b, out=c))(a, b, c)
    serve(args, one_step, gemms, losses)


# --- parent -----------------------------------------------------------------------------------------


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict | None = None):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{self.name} worker exited with {self.proc.wait()}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.proc.wait()
        return out


def flops_per_token(cfg: dict, seq: int) -> float:
    sys.path.insert(0, str(ROOT))
    from nemo_jax.config import ModelConfig
    return ModelConfig(max_seq_len=max(4096, seq), **cfg).flops_per_token(seq)


def summary(steps: list[dict], quiet: float) -> dict:
    """Best / median step over all timed steps, and the median over the quiet ones (the rest of the
    machine used < `quiet` cores during the step)."""
    t = [x["s"] for x in steps]
    q = [x["s"] for x in steps if x["others"] < quiet]
    qs = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
    return {"best": min(t), "median": statistics.median(t), "max": max(t),
            "iqr_pct": 100 * (qs[2] - qs[0]) / statistics.median(t),
            "quiet_median": statistics.median(q) if q else None, "quiet_n": len(q), "n": len(t),
            "others_median": statistics.median(x["others"] for x in steps),
            "cpu_per_step": statistics.median(x["cpu"] for x in steps),
            "page_faults_per_step": statistics.median(x["faults"] for x in steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quarter", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="override the preset's n_layers")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--loss-chunk", type=int, default=1024, help="nemo_jax train.loss_chunk (its default: 1024)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per framework per round")
    ap.add_argument("--threads", type=int, default=n_cores(), help="torch.set_num_threads (default: the cores)")
    ap.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--torch-compile", action="store_true",
                    help="also torch.compile the HF model (inductor; not the plain HF+PyTorch baseline)")
    ap.add_argument("--wait-idle", type=float, default=15.0,
                    help="before each timed step / peak probe, wait up to this many seconds for the rest of the "
                         "machine to go idle (0: don't)")
    ap.add_argument("--quiet", type=float, default=0.2,
                    help="a step is 'quiet' when the rest of the machine used fewer cores than this meanwhile")
    ap.add_argument("--jax-malloc", default="tuned", choices=("tuned", "default"),
                    help="tuned (default): the glibc malloc settings train.py runs with (nemo_jax/runtime.py: one "
                         "heap, reused step after step, instead of fresh mmaps that page-fault on every step); "
                         "default: glibc's defaults")
    ap.add_argument("--torch-malloc", default="default", choices=("tuned", "default"),
                    help="the same choice for the PyTorch worker (default: glibc's, what HF+PyTorch users get)")
    ap.add_argument("--scan-unroll", type=int, default=0,
                    help="nemo_jax model.scan_unroll (default: the model's layer count, a fully unrolled layer "
                         "loop, as configs/demo_*.yaml set it; 1: the rolled scan, train.py's default)")
    ap.add_argument("--also-jax", action="append", default=[], metavar="OPTIONS",
                    help="also time a nemo_jax worker with these options appended (e.g. '--jax-malloc default' or "
                         "'--scan-unroll 1'), interleaved with the others in the same rounds (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["n_layers"] = args.layers
    args.scan_unroll = args.scan_unroll or cfg["n_layers"]  # workers parse the same argv and get the same value

    if args.worker:
        (jax_worker if args.worker == "jax" else torch_worker)(args, cfg, args.work)
        return

    import numpy as np

    command = " ".join([".venv/bin/python", "benchmarks/train_step.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    B, T = args.batch, args.seq
    fpt = flops_per_token(cfg, T)
    print(f"config {cfg}, batch {B} x seq {T} = {B * T} tokens/step, fp32, {n_cores()} cores; "
          f"{fpt / 1e6:.1f} MFLOP/token, {fpt * B * T / 1e9:.1f} GFLOP/step", flush=True)
    busy0, t_run = machine_busy_s(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        work = Path(tmp)
        ids = np.random.default_rng(args.seed).integers(0, cfg["vocab_size"], size=(B, T + 1))
        np.savez(work / "batch.npz", tokens=ids[:, :-1].astype(np.int32), targets=ids[:, 1:].astype(np.int32))
        base = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--work", str(work), "--worker"]
        t0 = time.perf_counter()
        jw = Worker("jax", base + ["jax"])  # writes params.npz before torch reads it
        tw = Worker("torch", base + ["torch"])
        workers = {"jax": jw, "torch": tw}
        for i, opts in enumerate(args.also_jax):  # variants: the same worker with these options appended
            workers[f"jax{i + 2}"] = Worker(f"jax{i + 2}", base[:-3] + shlex.split(opts) + base[-3:] + ["jax"])
        print(f"workers ready in {time.perf_counter() - t0:.0f}s (jax compile {jw.info['compile_s']:.1f}s); "
              f"first-step loss: nemo_jax {jw.info['first_loss']:.6f}, PyTorch {tw.info['first_loss']:.6f}"
              + "".join(f", {n} {w.info['first_loss']:.6f}" for n, w in workers.items() if n not in ("jax", "torch")),
              flush=True)
        names = list(workers)
        steps = {n: [] for n in names}
        peaks = {n: {} for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # each worker goes first in turn
            line = []
            for name in order:
                got = workers[name].ask("peak")["peak"]
                for shape, rate in got.items():
                    peaks[name][shape] = max(peaks[name].get(shape, 0.0), rate)
                line.append(f"{name} {max(got.values()) / 1e9:.0f}")
            line = ["peak GFLOP/s: " + ", ".join(line), "steps s (others' cores):"]
            for name in order:
                out = workers[name].ask(f"steps {args.steps}")["steps"]
                steps[name] += out
                line.append(f"{name} " + " ".join(f"{x['s']:.3f} ({x['others']:.1f})" for x in out))
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(line), flush=True)
        final = {name: w.ask("steps 0") for name, w in workers.items()}
        for w in workers.values():
            w.close()
    run_s = time.perf_counter() - t_run
    load = (machine_busy_s() - busy0) / run_s  # includes this benchmark's own (mostly one worker at a time)

    peak = {name: max(p.values()) for name, p in peaks.items()}
    machine_peak = max(peak.values())
    res = {"command": command, "config": cfg, "batch": B, "seq": T, "cores": n_cores(),
           "flops_per_token": fpt, "peaks_gflops": {n: {k: v / 1e9 for k, v in p.items()} for n, p in peaks.items()},
           "machine_peak_gflops": machine_peak / 1e9, "frameworks": {}, "steps": steps,
           "machine_busy_cores_during_run": load}
    print()
    print("fp32 matmul peak, GFLOP/s (best over rounds; m x k x n)")
    shapes = list(peaks["jax"])
    print(f"  {'':8s}" + "".join(f"{s:>17s}" for s in shapes))
    for name in names:
        print(f"  {name:8s}" + "".join(f"{peaks[name][s] / 1e9:17.1f}" for s in shapes))
    print(f"  machine peak = the highest of these = {machine_peak / 1e9:.1f} GFLOP/s "
          f"(JAX {peak['jax'] / 1e9:.1f}, PyTorch {peak['torch'] / 1e9:.1f})")
    print()
    print(f"{'':26s}{'step s:':>8s}{'best':>7s}{'median':>8s}{'IQR%':>6s}{'quiet':>14s}"
          f"{'tokens/s':>10s}{'GFLOP/s':>9s}{'MFU':>7s}{'MFU own':>8s}{'CPU-s':>7s}{'faults':>8s}"
          f"{'loss@1':>10s}{'loss@end':>10s}")
    label = {"jax": "nemo_jax (JAX/XLA)",
             "torch": f"HF+PyTorch ({args.torch_attn}{', compiled' if args.torch_compile else ''})",
             **{f"jax{i + 2}": f"nemo_jax {opts}"[:33] for i, opts in enumerate(args.also_jax)}}
    for name in names:
        s = summary(steps[name], args.quiet)
        tps = B * T / s["best"]
        fl = fpt * tps
        info = workers[name].info
        res["frameworks"][name] = {**s, "tokens_per_s": tps, "tokens_per_s_median": B * T / s["median"],
                                   "gflops": fl / 1e9, "mfu": fl / machine_peak, "mfu_own_peak": fl / peak[name],
                                   "first_loss": info["first_loss"], "final_loss": final[name]["loss"],
                                   "version": info["version"]}
        quiet = f"{s['quiet_median']:.3f} ({s['quiet_n']}/{s['n']})" if s["quiet_n"] else f"- (0/{s['n']})"
        print(f"{label[name]:34s}{s['best']:7.3f}{s['median']:8.3f}{s['iqr_pct']:6.1f}{quiet:>14s}{tps:10.0f}"
              f"{fl / 1e9:9.1f}{100 * fl / machine_peak:6.1f}%{100 * fl / peak[name]:7.1f}%{s['cpu_per_step']:7.2f}"
              f"{s['page_faults_per_step'] / 1000:7.0f}k"
              f"{info['first_loss']:10.5f}{final[name]['loss']:10.5f}")
    fj, ft = res["frameworks"]["jax"], res["frameworks"]["torch"]
    ratio, ratio_med = fj["tokens_per_s"] / ft["tokens_per_s"], ft["median"] / fj["median"]
    res["ratio"], res["ratio_median"] = ratio, ratio_med
    ratio_q = ft["quiet_median"] / fj["quiet_median"] if fj["quiet_n"] and ft["quiet_n"] else None
    res["ratio_quiet_median"] = ratio_q
    loss_gap = abs(fj["first_loss"] - ft["first_loss"]) / abs(ft["first_loss"])
    print()
    print("tokens/s and MFU from the best step; 'quiet': median step over the steps during which the rest of the "
          f"machine used < {args.quiet} cores (count); CPU-s: median CPU-seconds per step (all threads); "
          "faults: median minor page faults per step")
    print(f"nemo_jax / PyTorch tokens/s: {ratio:.2f}x best, {ratio_med:.2f}x median"
          + (f", {ratio_q:.2f}x quiet median" if ratio_q else "")
          + f"   (goal >= 1.1x: {'met' if ratio >= 1.1 else 'NOT met'})")
    for i, opts in enumerate(args.also_jax):
        fv = res["frameworks"][f"jax{i + 2}"]
        print(f"  variant jax{i + 2} ({opts}): {fv['tokens_per_s'] / ft['tokens_per_s']:.2f}x best, "
              f"{ft['median'] / fv['median']:.2f}x median vs PyTorch; its median step / nemo_jax's: "
              f"{fv['median'] / fj['median']:.3f}, MFU {100 * fv['mfu']:.1f}% best step")
    print(f"nemo_jax MFU vs machine peak: {100 * fj['mfu']:.1f}% best step, "
          f"{100 * fj['mfu'] * fj['best'] / fj['median']:.1f}% median step   (goal >= 70%: "
          f"{'met' if fj['mfu'] >= 0.7 else 'NOT met'})")
    print(f"same function: first-step losses differ by {loss_gap:.1e} (relative); both ran "
          f"{1 + len(steps['jax'])} steps on the same batch")
    print(f"the machine was busy {load:.2f} of {n_cores()} cores on average during the run (this benchmark included; "
          f"it runs one worker at a time); {args.rounds} rounds x {args.steps} steps, interleaved, "
          f"each started after waiting <= {args.wait_idle:.0f}s for an idle machine")
    print(f"{fj['version']}; {ft['version']}; malloc: nemo_jax {args.jax_malloc} (train.py: tuned), "
          f"PyTorch {args.torch_malloc}; nemo_jax model.scan_unroll {args.scan_unroll}")
    print(f"command: {command}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
