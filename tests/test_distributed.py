"""DDP on CPU: 2 processes with gloo (torchrun) end with identical parameters on both ranks, equal to
one process trained with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusionkit  # noqa: F401
from fusionkit.engine.distributed import ShardedSampler
from fusionkit.engine.trainer import Trainer
from fusionkit.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data.train.size=32", "data.val.size=16", "train.epochs=1", "train.eval_every=0", "train.mixup=0",
          "drop_path=0", "train.log_every=1000", "train.distributed.backend=gloo"]

SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    import fusionkit
    from fusionkit.engine.distributed import full_state_dict
    from fusionkit.engine.trainer import Trainer
    from fusionkit.recipes import load_recipe

    out, overrides = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_recipe("tiny", overrides), out, progress=False)
    result = trainer.fit()
    rank = dist.get_rank()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    params = {n: v.clone() for n, v in full_state_dict(trainer.model).items() if n in trainable}
    save_file(params, f"{out}/rank{rank}.safetensors", metadata={"losses": repr(result.losses)})
    dist.barrier()
    dist.destroy_process_group()
""")


def test_sampler_shards_make_the_global_batch():
    one = list(ShardedSampler(10, seed=4, rank=0, world_size=1))
    shards = [list(ShardedSampler(10, seed=4, rank=r, world_size=2)) for r in range(2)]
    for i in range(0, 5, 2):  # batch of 2 per rank = batch of 4 in one process
        assert sorted(shards[0][i:i + 2] + shards[1][i:i + 2]) == sorted(one[2 * i:2 * i + 4])


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, fsdp):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "ddp"), *COMMON, "train.batch_size=4", f"train.distributed.fsdp={fsdp}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout kills the workers too
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ranks = [load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    trainer = Trainer(load_recipe("tiny", [*COMMON, "train.batch_size=8"]), tmp_path / "single", progress=False)
    trainer.fit()
    single = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(single) == set(ranks[0])
    for name, p in single.items():
        assert torch.allclose(p, ranks[0][name], atol=2e-5, rtol=1e-4), (name, (p - ranks[0][name]).abs().max())
    assert (tmp_path / "ddp" / "step_000000004.safetensors").is_file()  # rank 0 wrote the checkpoint


def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = ShardedSampler(20, seed=1), ShardedSampler(20, seed=1)
    a.set_epoch(3)
    b.set_epoch(3, start=5)
    assert list(a)[5:] == list(b)
