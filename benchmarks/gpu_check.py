"""`make gpu-check`: the first thing to run on a lent GPU (under 10 minutes on one H100). It checks what the
CPU tests cannot and measures what docs/scaling.md needs, then writes a Markdown report (outputs/gpu_check.md):

1. bf16 preference steps (fp32 master weights, bf16 autocast, AdamW, the DPO loss) on a GPT-2-124M-shaped and a
   SmolLM2-135M-shaped model (random init: speed and memory do not depend on the weights): tokens/s, MFU from
   counted FLOPs (6 x matmul parameters + 12 x layers x hidden x sequence per token), peak memory;
2. the same model, batch and init on CPU in fp32 against CUDA bf16: per-sequence log-probs and the loss within the
   stated bf16 tolerance (TOLERANCE);
3. trainer.strategy=fsdp2 in one process on CUDA (NCCL; parameters gathered in bf16): its losses against the
   unsharded autocast run's;
4. LoRA: only adapter weights move, tokens/s;
5. the packed listwise path (PL, n=8) against the plain rows, through CUDA bf16;
6. eval.backend=vllm when vllm imports: a saved tiny model generates.

Without a CUDA device it says so in one line and exits 0. `--cpu` runs every check on CPU at tiny sizes (a smoke
test of the script itself; numbers meaningless).

    python benchmarks/gpu_check.py [--out outputs/gpu_check.md] [--steps 10] [--cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import CONF, machine  # noqa: E402
from hps_exp import batching, memory, models  # noqa: E402

# bf16 keeps 8 significant bits: a sequence's log-prob (a sum of ~100 token log-probs) moves by up to ~1 %;
# the loss (a sigmoid of a difference of such sums) by a few hundredths.
TOLERANCE = {"logp_rel": 2e-2, "loss_abs": 5e-2}
# Dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity); the first substring match wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12))
SHAPES = {"gpt2-124m": "gpt2", "smollm2-135m": "smollm2-135m"}


# ---------------------------------------------------------------- pure logic (unit-tested on CPU)

def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that take part in a matrix product per token: every Linear / GPT-2 Conv1D, the LM head included
    (also when tied to the embedding); the embedding lookups are not products."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def train_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward + backward FLOPs per token (Chinchilla/PaLM counting): 6 x matmul parameters + attention's
    12 x layers x hidden x sequence (QK^T and AV, full square as the kernels compute it)."""
    shape = memory.shape_of(model.config)
    return 6.0 * matmul_parameters(model) + 12.0 * shape.layers * shape.hidden * seq_len


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if key in device_name), None)


def render(rows: list[dict], header: str) -> str:
    """A Markdown report: one table row per check (check, status, the numbers as key=value)."""
    lines = [header, "", "| check | status | numbers |", "|---|---|---|"]
    for r in rows:
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("check", "status"))
        lines.append(f"| {r['check']} | {r['status']} | {numbers} |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------- the batch, the model, the step

def token_batch(prompts: int, responses: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """A PreferenceBatch of random token ids (every slot real), with its packed rows."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(1, vocab, (prompt_len,), generator=g).tolist() for _ in range(prompts)]
    rs = [[torch.randint(1, vocab, (response_len,), generator=g).tolist() for _ in range(responses)] for _ in ps]
    pairs = [(p, r) for p, rr in zip(ps, rs) for r in rr]
    packed = batching.pack_rows(ps, [r for _, r in pairs], [b for b in range(prompts) for _ in range(responses)], 0)
    mask = torch.ones(prompts, responses, dtype=torch.bool)
    scores = torch.arange(responses, 0, -1, dtype=torch.float32).expand(prompts, responses).clone()
    ref = -torch.rand(prompts, responses, generator=g) * response_len * 3
    return batching.PreferenceBatch(batching.collate(pairs, 0), mask, ref, scores,
                                    torch.full((prompts,), responses - 1), {}, packed, prompts)


def loss_named(name: str):
    from omegaconf import OmegaConf

    from hps_exp.config import build

    return build(OmegaConf.load(CONF / "loss" / f"{name}.yaml"), "loss")


def random_model(shape: str, device, cpu_tiny: bool):
    """A randomly initialised model of a known shape (memory.KNOWN_SHAPES), fp32 weights on `device`."""
    from transformers import AutoModelForCausalLM

    config = memory.model_config({"name_or_path": memory.KNOWN_PREFIX + shape})
    if cpu_tiny:   # the smoke test: the same architecture, 2 layers, small widths
        text = config.get_text_config()
        for name, value in (("num_hidden_layers", 2), ("hidden_size", 64), ("intermediate_size", 128),
                            ("vocab_size", 512), ("n_inner", None)):
            if hasattr(text, name):
                setattr(text, name, value)
        if getattr(text, "num_key_value_heads", None):
            text.num_attention_heads, text.num_key_value_heads = 4, 2
        elif hasattr(text, "n_head"):
            text.n_head = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    models.disable_dropout(model)
    return model.to(device)


def preference_step(model, batch, loss_fn, pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, [B, M] policy log-probs): the preference stage's step (hps_exp/stages.py) without the trainer."""
    dev = next(model.parameters()).device
    logps = batching.preference_logps(model, batch, pack=pack)
    out = loss_fn(logps, batch.ref_logps.to(dev), batch.mask.to(dev), batch.scores.to(dev),
                  batch.num_negatives.to(dev))
    return out.losses.mean(), logps


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, batch, loss_fn, device, dtype, steps: int, pack: bool = False) -> dict:
    """`steps` AdamW steps on one batch: median step seconds (the first, warm-up, left out), losses, peak memory."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, losses = [], []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss, _ = preference_step(model, batch, loss_fn, pack)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": statistics.median(seconds[1:] or seconds), "losses": losses, "peak_bytes": peak}


# ---------------------------------------------------------------- the checks (each returns a report row)

def check_throughput(shape: str, device, dtype, steps: int, tiny: bool, sizes: dict) -> dict:
    model = random_model(SHAPES[shape], device, tiny)
    batch = token_batch(sizes["prompts"], 2, sizes["prompt_len"], sizes["response_len"], model.config.vocab_size)
    r = train_steps(model, batch, loss_named("dpo"), device, dtype, steps)
    seq = sizes["prompt_len"] + sizes["response_len"]
    tokens = batch.sequences.input_ids.numel()
    row = {"check": f"bf16 preference steps, {shape} (random init)", "status": "ok",
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "tokens_per_step": tokens,
           "step_s": r["step_s"], "tokens_per_s": tokens / r["step_s"]}
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peak:
        row["MFU"] = train_flops_per_token(model, seq) * tokens / r["step_s"] / peak
    if r["peak_bytes"] is not None:
        row["peak_GiB"] = r["peak_bytes"] / 2 ** 30
    if not all(map(torch.isfinite, map(torch.tensor, r["losses"]))):
        row["status"] = "FAIL: non-finite loss"
    return row


def check_against_cpu_fp32(device, dtype, tiny: bool, sizes: dict) -> dict:
    """The same init and batch: CPU fp32 against `device` under `dtype` autocast."""
    loss_fn = loss_named("dpo")
    cpu = random_model("gpt2", torch.device("cpu"), tiny)
    batch = token_batch(sizes["prompts"], 2, sizes["prompt_len"], sizes["response_len"], cpu.config.vocab_size)
    with torch.no_grad():
        loss32, logp32 = preference_step(cpu, batch, loss_fn)
        with autocast(device, dtype):
            loss16, logp16 = preference_step(cpu.to(device), batch, loss_fn)
    rel = float(((logp16.float().cpu() - logp32) / logp32.abs()).abs().max())
    dloss = abs(float(loss16) - float(loss32))
    ok = rel <= TOLERANCE["logp_rel"] and dloss <= TOLERANCE["loss_abs"]
    return {"check": f"{device.type} {dtype or 'fp32'} vs CPU fp32 (gpt2-124m shape, DPO)",
            "status": "ok" if ok else "FAIL", "max_rel_logp_diff": rel,
            "loss_abs_diff": dloss,
            "tolerance": f"{TOLERANCE['logp_rel']:g} rel / {TOLERANCE['loss_abs']:g} abs"}


@contextlib.contextmanager
def one_process_group(device):
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/store",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def check_fsdp2(device, dtype, steps: int, tiny: bool, sizes: dict) -> dict:
    """strategies.shard_from_rank0 in a one-process group (what every fsdp2 rank runs) against the unsharded model."""
    from hps_exp.distributed import World
    from hps_exp.strategies import shard_from_rank0

    loss_fn = loss_named("dpo")
    plain = random_model("smollm2-135m", device, tiny)
    batch = token_batch(sizes["prompts"], 2, sizes["prompt_len"], sizes["response_len"], plain.config.vocab_size)
    ref = train_steps(plain, batch, loss_fn, device, dtype, steps)
    with one_process_group(device):
        sharded = shard_from_rank0(random_model("smollm2-135m", "cpu", tiny), World(device=device), dtype)
        got = train_steps(sharded, batch, loss_fn, device, None, steps)   # fsdp2 casts the parameters itself
    diff = max(abs(a - b) for a, b in zip(ref["losses"], got["losses"]))
    ok = diff <= TOLERANCE["loss_abs"]
    return {"check": f"fsdp2, one process on {device.type} (smollm2-135m shape)", "status": "ok" if ok else "FAIL",
            "max_loss_diff_vs_autocast": diff, "step_s": got["step_s"], "autocast_step_s": ref["step_s"],
            **({"peak_GiB": got["peak_bytes"] / 2 ** 30} if got["peak_bytes"] is not None else {})}


def check_lora(device, dtype, steps: int, tiny: bool, sizes: dict) -> dict:
    model = models.apply_lora(random_model("smollm2-135m", device, tiny), {"enabled": True, "r": 16})
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = token_batch(sizes["prompts"], 2, sizes["prompt_len"], sizes["response_len"], model.config.vocab_size)
    r = train_steps(model, batch, loss_named("dpo"), device, dtype, steps)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    ok = bool(moved) and all("lora_" in k for k in moved)
    return {"check": "LoRA r=16 (smollm2-135m shape)", "status": "ok" if ok else f"FAIL: moved {sorted(moved)[:3]}",
            "step_s": r["step_s"], "tokens_per_s": batch.sequences.input_ids.numel() / r["step_s"],
            **({"peak_GiB": r["peak_bytes"] / 2 ** 30} if r["peak_bytes"] is not None else {})}


def check_packed(device, dtype, tiny: bool, sizes: dict) -> dict:
    """PL over n=8 responses: the packed rows (each prompt forwarded once) against one row per response."""
    model = random_model("smollm2-135m", device, tiny)
    # short responses, so that a prompt and its 8 responses share one packed row (batching.PACK_ROW_TOKENS)
    batch = token_batch(sizes["prompts"], 8, 64, (batching.PACK_ROW_TOKENS - 64) // 8, model.config.vocab_size)
    if not batching.packing_supported(model):
        return {"check": "packed listwise rows (PL, n=8)", "status": "FAIL: packing not supported on this device"}
    loss_fn = loss_named("pl")
    with torch.no_grad(), autocast(device, dtype):
        plain_loss, plain = preference_step(model, batch, loss_fn, pack=False)
        packed_loss, packed = preference_step(model, batch, loss_fn, pack=True)
    rel = float(((packed - plain) / plain.abs()).abs().max())
    ok = rel <= TOLERANCE["logp_rel"]
    return {"check": "packed listwise rows vs plain rows (PL, n=8, smollm2-135m shape)",
            "status": "ok" if ok else "FAIL", "max_rel_logp_diff": rel,
            "rows_packed_vs_plain": f"{len(batch.packed.input_ids)} vs {len(batch.sequences.input_ids)}",
            "loss_abs_diff": abs(float(packed_loss) - float(plain_loss))}


def check_vllm(tiny_dir: Path) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return {"check": "eval.backend=vllm", "status": f"skipped: vllm does not import ({e})"}
    from hps_exp.generation import build_generator

    t0 = time.perf_counter()
    gen = build_generator("vllm", model_dir=tiny_dir, max_prompt_length=64, seed=0, gpu_memory_utilization=0.3)
    texts = gen.generate(["\n\nHuman: hello\n\nAssistant:"] * 4, n=2, max_new_tokens=16, temperature=0.7,
                         top_p=1.0, seed=0)
    ok = len(texts) == 4 and all(len(t) == 2 for t in texts)
    return {"check": "eval.backend=vllm (tiny model)", "status": "ok" if ok else f"FAIL: {texts!r}"[:200],
            "seconds": time.perf_counter() - t0}


def save_tiny(directory: Path) -> Path:
    from omegaconf import OmegaConf

    from hps_exp.config import ModelConfig
    from hps_exp.data import synthetic

    cfg = OmegaConf.structured(ModelConfig)   # model=tiny: the schema's defaults
    train = synthetic.load(n_train=16, n_test=2, n_responses=2).train
    tok = models.train_tokenizer([e.prompt + r for e in train for r in e.responses], cfg.vocab_size)
    models.save(models.build_tiny(cfg, len(tok), 0), tok, directory)
    return directory


# ---------------------------------------------------------------- main

def run_checks(device: torch.device, dtype, steps: int, tiny: bool) -> list[dict]:
    sizes = ({"prompts": 2, "prompt_len": 16, "response_len": 16} if tiny
             else {"prompts": 16, "prompt_len": 256, "response_len": 256})
    checks = [("throughput gpt2-124m", lambda: check_throughput("gpt2-124m", device, dtype, steps, tiny, sizes)),
              ("throughput smollm2-135m", lambda: check_throughput("smollm2-135m", device, dtype, steps, tiny, sizes)),
              ("against CPU fp32", lambda: check_against_cpu_fp32(device, dtype, tiny, sizes)),
              ("fsdp2 one process", lambda: check_fsdp2(device, dtype, steps, tiny, sizes)),
              ("LoRA", lambda: check_lora(device, dtype, steps, tiny, sizes)),
              ("packed listwise rows", lambda: check_packed(device, dtype, tiny, sizes))]
    if device.type == "cuda":
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        checks.append(("eval.backend=vllm", lambda: check_vllm(save_tiny(tmp / "tiny"))))
    rows = []
    for name, check in checks:
        try:
            rows.append(check())
        except Exception as e:  # noqa: BLE001 - one failing check is reported, the others still run
            rows.append({"check": name, "status": f"ERROR {type(e).__name__}: {e}"[:300],
                         "where": traceback.format_exc().strip().splitlines()[-3].strip()[:200]})
        print(render(rows[-1:], "").splitlines()[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/gpu_check.md")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="run every check on CPU at tiny sizes (smoke test)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              f"nothing to check")
        return 0
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    name = "CPU (smoke test, tiny sizes)" if args.cpu else torch.cuda.get_device_name(device)
    started = time.perf_counter()
    rows = run_checks(device, torch.bfloat16, args.steps, tiny=args.cpu)
    header = (f"# gpu_check: {name}\n\n{machine()} | CUDA {torch.version.cuda} | {time.perf_counter() - started:.0f}s"
              f"\n\nbf16 tolerance against CPU fp32: {TOLERANCE}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, header))
    print(f"gpu_check: wrote {out}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
