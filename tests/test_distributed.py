"""Data-parallel training (trainer.strategy=ddp|fsdp2) matches one process; DCP checkpoints reshard;
uneven data fails fast instead of hanging. Multi-process cases run this file as a torchrun worker
(`python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py ...`) with gloo on CPU.

Tolerance: parameters after 4 steps equal the one-process run with the same global batch to atol 5e-5
(fp32). Measured: 2 processes differ from 1 by up to ~9e-6; the SAME computation in one process with each
micro-batch split in two accumulated halves (mathematically identical) already differs by ~1.1e-5 —
summation order, amplified by Adam on near-zero gradients. A wrong loss weighting (mean of rank means)
differs by 7e-2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hps_exp.distributed import DistributedError, World, cuda_index, first_slurm_host, launch_env, slurm_port  # noqa: E402

ATOL = 5e-5
MAX_NORM = 0.3
# 10 prompts in global micro-batches of 3, 3, 3, 1: shares 2/1 (uneven) and 1/0 (rank 1 pads, weight 0);
# a wrong weighting (e.g. the mean of rank means) moves the parameters far beyond the tolerance.
N_PROMPTS, N_RESP, GLOBAL_BATCH = 10, 3, 3


# ---------------------------------------------------------------- fast unit tests of the World

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_NODELIST": "gpu[07-08,11]"}   # + the step's variables


def test_launch_env_reads_torchrun_then_slurm():
    assert launch_env({}) is None
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    tr = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234",
                     "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
                     "SLURM_NODELIST": "x[1-2]"})
    assert tr == dict(rank=3, world_size=8, local_rank=1, master_addr="h1", master_port=1234)
    step = {**SRUN, "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
            "SLURM_STEP_NODELIST": "gpu[08,11]"}
    assert launch_env(step) == dict(rank=5, world_size=16, local_rank=5, master_addr="gpu08", master_port=24242)
    assert launch_env({**step, "MASTER_PORT": "1234", "MASTER_ADDR": "h"})["master_port"] == 1234
    one = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0"}
    assert launch_env(one) is None   # a one-task srun: not distributed
    with pytest.raises(DistributedError, match="WORLD_SIZE='two'"):
        launch_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(DistributedError, match=r"\bSLURM_LOCALID\b"):
        launch_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODELIST": "a1"})


def test_a_plain_python_in_an_sbatch_script_is_one_process():
    """The batch step of `sbatch --ntasks=8` has SLURM_PROCID=0 and SLURM_NTASKS=8 but no step variables: it must
    not wait for 7 peers that no one starts."""
    assert launch_env({**SRUN, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}) is None


def test_two_jobs_on_one_node_get_different_ports():
    ports = {launch_env({**SRUN, "SLURM_JOB_ID": job, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                         "SLURM_STEP_NUM_TASKS": "2"})["master_port"] for job in ("4242", "4243")}
    assert len(ports) == 2 and all(1024 < p < 65536 for p in ports)
    assert slurm_port({}) == 29500   # no job id (a hand-made environment): torch's usual port


def test_cuda_device_is_the_local_rank_among_the_visible_devices():
    assert cuda_index(5, 8) == 5            # each task sees the node's 8 GPUs
    assert cuda_index(5, 1) == 0            # srun --gpus-per-task=1 / --gpu-bind: each sees its own GPU only
    assert cuda_index(3, 2) == 1            # 2 GPUs per task
    with pytest.raises(DistributedError, match=r"\bCUDA\b.*\bCUDA_VISIBLE_DEVICES\b"):
        cuda_index(0, 0)


def test_first_slurm_host():
    assert first_slurm_host("node001") == "node001"
    assert first_slurm_host("a1,a2") == "a1"
    assert first_slurm_host("gpu[03-05,07],cpu1") == "gpu03"


def test_sharding_by_prompt_and_padding():
    items = list(range(5))
    parts = [World(rank=r, world_size=2).shard(items) for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    assert World(rank=1, world_size=2).shard_padded([7]) == ([7], 0)     # padding share, weight 0
    assert World(rank=0, world_size=2).shard_padded([7]) == ([7], 1)


def test_single_process_world_is_a_no_op():
    w = World()
    assert w.is_main and not w.distributed
    w.barrier()
    assert w.broadcast_object({"x": 1}) == {"x": 1} and w.gather_object(3) == [3]
    assert w.shard([1, 2, 3]) == [1, 2, 3]


def test_vllm_evaluation_leaves_the_process_group_first(tmp_path, monkeypatch):
    """Rank 0 evaluates alone after training; vLLM sets up its own torch.distributed world, so the job's group
    must be gone when the engine is built."""
    import torch.distributed as dist

    from hps_exp import stages
    from hps_exp.stages import evaluation

    seen = {}

    class Built(Exception):
        pass

    def fake_build_generator(backend, **kw):
        seen["group_live"] = dist.is_initialized()
        raise Built

    monkeypatch.setattr(evaluation, "build_generator", fake_build_generator)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        spec = stages.EvalSpec("default", 1, 1, 4, 0.7, 1.0, 1, 8, 16, 0, backend="vllm")
        env = stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path)
        with pytest.raises(Built):
            evaluation._evaluate(spec, None, None, stages.EvalSet("x", stages.Examples.of([])),
                             stages.RefLogps((), "k", 0.0), (), None, env, stages.MarginReward())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == {"group_live": False}


# ---------------------------------------------------------------- the worker (run by torchrun or plainly)

def _loss(kind: str):
    """A loss of the given input kind from conf/loss, built without Hydra (no loss named here)."""
    from omegaconf import OmegaConf

    from hps_exp.config import build

    for path in sorted((ROOT / "conf" / "loss").glob("*.yaml")):
        fn = build(OmegaConf.load(path), "loss")
        if fn.input_kind == kind and (kind == "pair" or fn.needs_scores):
            return fn
    raise LookupError(kind)


def _data():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 60, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_PROMPTS)]
    responses = [[torch.randint(1, 60, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
                  for _ in range(N_RESP)] for _ in range(N_PROMPTS)]
    ref = torch.randn(N_PROMPTS, N_RESP, generator=g) - 8.0
    scores = torch.arange(N_RESP, 0, -1, dtype=torch.float32).expand(N_PROMPTS, N_RESP).clone()
    return prompts, responses, ref, scores


class Micro:
    def __init__(self, seqs, packed, ref, scores, weight, sources):
        self.seqs, self.packed, self.ref, self.scores = seqs, packed, ref, scores
        self.weight, self.sources = weight, sources


def worker(args: list[str]) -> None:
    import numpy as np

    from hps_exp import batching
    from hps_exp.config import TrainerConfig
    from hps_exp.distributed import init_world, shutdown
    from hps_exp.models import build_tiny, disable_dropout
    from hps_exp.trainer import Trainer

    strategy, kind, out = args[0], args[1], Path(args[2])
    opts = json.loads(args[3]) if len(args) > 3 else {}
    world = init_world("cpu", timeout_s=opts.get("dist_timeout", 60))
    torch.manual_seed(0)
    from omegaconf import OmegaConf

    model = build_tiny(OmegaConf.create({"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32}), 64, seed=0)
    disable_dropout(model)
    if opts.get("lora"):
        from hps_exp.models import configure

        model = configure(model, OmegaConf.create({"lora": {"enabled": True, "r": 4, "alpha": 8}}))
        if world.is_main:
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "init.pt")
    loss_fn = _loss(kind)
    width = 2 if kind == "pair" else N_RESP
    prompts, responses, ref, scores = _data()
    calls = 0

    def make_epoch(epoch, progress):
        order = np.random.default_rng([0, epoch]).permutation(N_PROMPTS)
        batches = [order[s:s + GLOBAL_BATCH] for s in range(0, N_PROMPTS, GLOBAL_BATCH)]
        if opts.get("drop_last_on_rank1") and world.rank == 1:
            batches = batches[:-1]
        for idx in batches:
            local, n = world.shard_padded(list(idx))
            pairs = [(prompts[i], responses[i][m]) for i in local for m in range(width)]
            packed = batching.pack_rows([prompts[i] for i in local], [r for _, r in pairs],
                                        [b for b in range(len(local)) for _ in range(width)], 0)
            yield Micro(batching.collate(pairs, 0), packed, ref[local, :width], scores[local, :width], n,
                        [f"row{i}" for i in local])

    def step(module, b: Micro):
        nonlocal calls
        calls += 1
        if calls == opts.get("die_at_call"):
            os._exit(9)   # a hard kill: no handler, no save
        mask = torch.ones(b.ref.shape, dtype=torch.bool)
        if opts.get("pack"):   # the packed listwise rows (each prompt forwarded once), through the wrapper
            pb = batching.PreferenceBatch(b.seqs, mask, b.ref, b.scores, torch.zeros(len(mask)), {}, b.packed)
            logps = batching.preference_logps(module, pb)
        else:                  # one (prompt, response) row each; head-only log-softmax
            logps = batching.sequence_logps(module, b.seqs).view(-1, width)
        o = loss_fn(logps, b.ref, mask, b.scores, torch.full((logps.shape[0],), width - 1))
        return o.losses.mean(), {k: float(v) for k, v in o.metrics.items()}

    class RankLog:   # would write a file on every rank it is called on: only rank 0 may
        def log(self, metrics, step):
            with (out / f"log-rank{world.rank}.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    # max_grad_norm below the gradients' norms (~0.25-0.47): clipping acts, on the DTensor norm under fsdp2.
    cfg = TrainerConfig(lr=0.01, epochs=3, grad_accum=2, warmup_ratio=0.0, schedule="constant", log_every=1,
                        max_grad_norm=MAX_NORM,
                        strategy=strategy, max_steps=opts.get("max_steps"), save_every=opts.get("save_every", 0))
    trainer = Trainer(model, cfg, cfg, cfg.epochs, cfg.max_steps, device=world.device, autocast=None,
                      logger=RankLog(), stage="train", checkpoint=Path(opts["ckpt"]) if "ckpt" in opts else None,
                      world=world)
    result = trainer.fit(make_epoch, -(-N_PROMPTS // GLOBAL_BATCH), step)
    # Which fast paths ran on the module the steps saw (the DDP wrapper / the FSDP2-sharded model).
    fast = {"head_only": batching.scoring_head(trainer.module) is not None,
            "packed": batching.packing_supported(trainer.module)}
    sd = trainer.full_state_dict()
    # The World's other collectives, as the stages use them (rank 0 merges, everyone agrees).
    checks = {"bcast": world.broadcast_object({"from": world.rank}),
              "gather": world.gather_object(world.rank * 10)}
    if world.is_main:
        torch.save(sd, out / "params.pt")
        (out / "result.json").write_text(json.dumps({**{k: v for k, v in result.items() if k != "seconds"},
                                                     "world": world.world_size, "checks": checks, "fast": fast}))
    if opts.get("save_pretrained"):
        from transformers import PreTrainedTokenizerFast

        tok = _tokenizer(PreTrainedTokenizerFast)
        trainer.save_pretrained(tok, out / "policy", lora_save="adapter")
    shutdown()


def sft_worker(out: Path, opts: dict) -> None:
    """The SFT stage (tiny GPT-2, synthetic data) under fsdp2, recording on each rank whether the model reached
    the sharding call on the meta device. opts["every_rank_loads"]: the behaviour before meta loading."""
    from hps_exp import stages, strategies
    from hps_exp.config import OptimConfig, RuntimeConfig
    from hps_exp.data.synthetic import load
    from hps_exp.distributed import init_world, shutdown
    from hps_exp.stages import sft_reference

    world = init_world("cpu", timeout_s=60)
    if opts.get("every_rank_loads"):
        sft_reference.weights_from_rank0 = lambda env: False
    seen = {}
    real_shard = strategies.shard_from_rank0

    def recording_shard(model, world, param_dtype=None):   # the first call trains (SFT), the second scores
        params = list(model.parameters())
        seen.setdefault("calls_meta", []).append(all(p.is_meta for p in params))
        if "meta" not in seen:
            seen.update(meta=all(p.is_meta for p in params), resident_bytes=sum(
                p.numel() * p.element_size() for p in params if not p.is_meta))
        sharded = real_shard(model, world, param_dtype)
        seen.setdefault("shard_bytes", sum(p.to_local().numel() * p.element_size() for p in sharded.parameters()))
        return sharded

    # where it is used: strategies.wrap (the trainer) calls it, and the reference pass imports it from strategies
    strategies.shard_from_rank0 = recording_shard
    spec = stages.SFTSpec(model=stages.ModelSpec(None, 2, 2, 16, 64, 300, 24, 48), enabled=True, targets="all",
                          epochs=1, batch_size=4, seed=0,
                          optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"))
    env = stages.Env(device=world.device, autocast=None, cache_dir=out / "cache", world=world,
                     runtime=stages.Runtime(RuntimeConfig(strategy="fsdp2")))
    train = stages.Examples.of(load(n_train=12, n_test=2, n_responses=3).train)
    result = stages.sft(spec, train, env)
    ref = stages.reference(stages.ReferenceSpec(24, 48), result, train, env)   # sharded, then gathered once
    if world.is_main:
        torch.save(list(ref.logps), out / "ref.pt")
    (out / f"rank{world.rank}.json").write_text(json.dumps({**seen, "path": str(result.path), "key": result.key}))
    shutdown()


def _tokenizer(cls):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({str(i): i for i in range(64)} | {"<unk>": 0}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return cls(tokenizer_object=t, eos_token="0", pad_token="0")


# ---------------------------------------------------------------- multi-process tests (slow)

def _run(out: Path, strategy: str, kind: str, nproc: int, timeout: int = 300, **opts) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPS_EXP_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    me = str(Path(__file__).resolve())
    if nproc == 1:
        cmd = [sys.executable, me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", me]
    return subprocess.run(cmd + [strategy, kind, str(out), json.dumps(opts)], env=env, cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def _params(out: Path) -> dict:
    return torch.load(out / "params.pt", weights_only=True)


def _assert_close(a: dict, b: dict, atol=ATOL) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"max |param diff| = {worst:.2e} (atol {atol})")
    assert worst <= atol, f"max |diff| {worst} > {atol}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process reference per loss kind, run once."""
    cache = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"single-{kind}")
            r = _run(out, "none", kind, 1, max_steps=4)
            assert r.returncode == 0, r.stdout
            cache[kind] = out
        return cache[kind]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy,kind", [("ddp", "pair"), ("ddp", "ranking"), ("fsdp2", "pair"),
                                           ("fsdp2", "ranking")])
def test_two_processes_match_one(tmp_path, one_process, strategy, kind):
    """The wrapped runs take the fast paths (head-only log-softmax; listwise: the packed rows, each prompt
    forwarded once) and equal one unwrapped process on plain (prompt, response) rows."""
    ref = one_process(kind)
    out = tmp_path / "run"
    r = _run(out, strategy, kind, 2, max_steps=4, save_pretrained=True, pack=kind == "ranking")
    assert r.returncode == 0, r.stdout
    _assert_close(_params(out), _params(ref))
    r0 = json.loads((ref / "result.json").read_text())
    assert r0["steps"] == 4
    r2 = json.loads((out / "result.json").read_text())
    assert r2["world"] == 2 and r2["checks"] == {"bcast": {"from": 0}, "gather": [0, 10]}
    assert r2["fast"] == {"head_only": True, "packed": True}, r2["fast"]
    # Metrics are all-reduced: rank 0's logged loss equals the one-process loss at every step.
    logs = [json.loads(x) for x in (out / "log-rank0.jsonl").read_text().splitlines()]
    ref_logs = [json.loads(x) for x in (ref / "log-rank0.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logs] == [1, 2, 3, 4]
    assert any(x["train/grad_norm"] > MAX_NORM for x in logs)   # clipping was active
    for a, b in zip(logs, ref_logs):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5, (a, b)
    # Only rank 0 wrote: no rank-1 log, and the saved policy is a plain safetensors directory.
    assert sorted(p.name for p in out.iterdir()) == ["log-rank0.jsonl", "params.pt", "policy", "result.json"]
    from safetensors.torch import load_file

    saved, trained = load_file(out / "policy" / "model.safetensors"), _params(out)
    assert saved and all(torch.equal(v, trained[k]) for k, v in saved.items())
    # GPT-2's LM head is tied to the embedding: written once, as a one-process save does (no extra lm_head.weight)
    assert "lm_head.weight" in trained and "lm_head.weight" not in saved and "transformer.wte.weight" in saved


@pytest.mark.slow
def test_lora_under_fsdp2_matches_one_process_and_trains_only_adapters(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(one, "none", "pair", 1, max_steps=4, lora=True).returncode == 0
    r = _run(two, "fsdp2", "pair", 2, max_steps=4, lora=True, save_pretrained=True)
    assert r.returncode == 0, r.stdout
    _assert_close(_params(two), _params(one))
    init, final = torch.load(one / "init.pt", weights_only=True), _params(two)
    changed = {k for k in init if not torch.allclose(init[k], final[k], atol=1e-7)}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert (two / "policy" / "adapter_model.safetensors").is_file()   # adapter-only save from sharded weights


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dcp_resume_after_kill_at_two_and_one_process(tmp_path, one_process, lora):
    """LoRA: the checkpoint holds the adapters only (the frozen base is rebuilt), sharded or not."""
    import shutil

    uninterrupted = tmp_path / "full"
    assert _run(uninterrupted, "none", "ranking", 1, max_steps=6, lora=lora).returncode == 0
    ckpt = tmp_path / "ckpt"
    # fsdp2 on 2 ranks; an epoch is 4 micro-batches = 2 steps (grad_accum 2), so steps 2 (epoch end) and
    # 3 (save_every) save; hard-killed inside step 4 (its first micro-batch is call 7).
    killed = _run(tmp_path / "killed", "fsdp2", "ranking", 2, max_steps=6, save_every=3, die_at_call=7,
                  ckpt=str(ckpt), lora=lora)
    assert killed.returncode != 0
    assert ckpt.is_dir() and not list(tmp_path.glob(".ckpt.tmp*"))
    import torch.distributed.checkpoint as dcp

    weights = [k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights) == lora, weights[:5]
    ckpt1 = tmp_path / "ckpt_copy"
    shutil.copytree(ckpt, ckpt1)
    resumed2 = _run(tmp_path / "resumed2", "fsdp2", "ranking", 2, max_steps=6, ckpt=str(ckpt), lora=lora)
    assert resumed2.returncode == 0 and "resumed from" in resumed2.stdout and "at step 3/6" in resumed2.stdout, \
        resumed2.stdout
    _assert_close(_params(tmp_path / "resumed2"), _params(uninterrupted))
    # The same sharded checkpoint resumed by ONE process (strategy none): DCP reshards on load.
    resumed1 = _run(tmp_path / "resumed1", "none", "ranking", 1, max_steps=6, ckpt=str(ckpt1), lora=lora)
    assert resumed1.returncode == 0 and "at step 3/6" in resumed1.stdout, resumed1.stdout
    _assert_close(_params(tmp_path / "resumed1"), _params(uninterrupted))


@pytest.mark.slow
def test_uneven_micro_batch_counts_fail_fast_instead_of_hanging(tmp_path):
    r = _run(tmp_path / "uneven", "ddp", "pair", 2, timeout=120, drop_last_on_rank1=True, dist_timeout=20)
    assert r.returncode != 0
    assert "ranks yielded different numbers of micro-batches [2, 1]" in r.stdout, r.stdout[-3000:]


@pytest.mark.slow
def test_fsdp2_ranks_but_0_build_on_meta_and_train_the_same_weights(tmp_path):
    """Only rank 0 holds the whole model: rank 1 reaches fully_shard with every parameter on the meta device (SFT
    and the reference pass) and gets its shards from rank 0, ending at exactly the weights of the run in which
    every rank loaded the model; the sharded reference log-probs equal one process's."""
    from safetensors.torch import load_file

    runs = {}
    for name, opts in (("meta", {}), ("every_rank", {"every_rank_loads": True})):
        r = _run(tmp_path / name, "sft", "-", 2, **opts)
        assert r.returncode == 0, r.stdout[-3000:]
        runs[name] = [json.loads((tmp_path / name / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert runs["meta"][1]["meta"] and runs["meta"][1]["resident_bytes"] == 0
    assert runs["meta"][1]["calls_meta"] == [True, True]   # SFT and the reference pass: rank 1 never loads
    assert not runs["meta"][0]["meta"] and runs["meta"][0]["resident_bytes"] > 0   # rank 0 holds it (host memory)
    assert not runs["every_rank"][1]["meta"]                                        # before: a full copy per rank
    a, b = (load_file(Path(runs[n][0]["path"]) / "model.safetensors") for n in ("meta", "every_rank"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The memory planner's per-GPU parameter bytes under fsdp2 x 2 against what each rank really holds (FSDP2
    # pads each tensor's first dimension to a multiple of the world size: within 2 %).
    from hps_exp import memory, models

    model = models.load_saved(Path(runs["meta"][0]["path"]), meta=True)[1]
    setting = memory.Setting("fsdp2", 2, "fp32", "fp32", 4, 2, 48, False, 8)
    planned = memory.plan(model, model.config, setting, memory.ActivationFit(0, 0, 0))["parameters"]
    for rank in runs["meta"]:
        assert rank["shard_bytes"] == pytest.approx(planned, rel=0.02)
    # The sharded reference pass (each rank its share, the model gathered once) equals one process scoring all.
    from hps_exp import stages
    from hps_exp.data.synthetic import load

    sft = stages.SFTResult(Path(runs["meta"][0]["path"]), runs["meta"][0]["key"], 0.0)
    one = stages.reference(stages.ReferenceSpec(24, 48), sft,
                           stages.Examples.of(load(n_train=12, n_test=2, n_responses=3).train),
                           stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "one"))
    two = torch.load(tmp_path / "meta" / "ref.pt", weights_only=True)
    assert len(two) == len(one.logps) == 12
    assert max(float((a - b).abs().max()) for a, b in zip(one.logps, two)) < 1e-5


if __name__ == "__main__":
    if sys.argv[1] == "sft":
        sft_worker(Path(sys.argv[3]), json.loads(sys.argv[4]))
    else:
        worker(sys.argv[1:])
