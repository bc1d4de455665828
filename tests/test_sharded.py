"""Solving shared out over DDP ranks: two gloo processes end with the same bits as one process solving all."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from obc_lightning.scheduling import shard_plan

WORKER = textwrap.dedent(
    """
    import os, sys, warnings
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    sys.path.insert(0, {tests_dir!r})
    sys.path.insert(0, os.path.dirname({tests_dir!r}))  # this checkout's obc_lightning, whatever is installed
    warnings.simplefilter("ignore")


    def state(model):
        return {{n: p.detach().clone() for n, p in model.state_dict().items()}}


    def entries(report):
        return [dict(vars(m)) for m in report.modules]


    def codes(report):
        return {{n: [r.codes for r in rs] for n, rs in report.results.items()}}


    def worker(rank, out):
        import obc_lightning.compress as compress
        import obc_lightning.scheduling as scheduling
        from obc_lightning import compress_model
        from test_batched import images, net

        dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "rendezvous"), rank=rank,
                                world_size=2)
        torch.manual_seed(0)
        batches = images(n=2 + rank)  # each rank its own data; the all-reduce makes the Hessians equal

        def reduce_fn(t):
            dist.all_reduce(t)

        solved = []
        real_prepare = scheduling.prepare_module

        def spy(name, *args, **kwargs):
            solved.append(name)
            return real_prepare(name, *args, **kwargs)

        scheduling.prepare_module = spy
        saved = {{}}
        for mode, kw in (("one", dict(bits=4)), ("seq", dict(bits=4, sequential=True)),
                         ("prune", dict(bits=3, sparsity=0.5, group_size=8)),
                         ("target", dict(target_bits=3.5, allocation_steps=4))):
            everyone, shared = net(), net()
            solved.clear()
            ra = compress_model(everyone, batches, reduce_fn=reduce_fn, keep_results=True, **kw)
            all_names = solved[:]
            solved.clear()
            rb = compress_model(shared, batches, reduce_fn=reduce_fn, keep_results=True, distributed=True, **kw)
            saved[mode] = dict(everyone=state(everyone), shared=state(shared), entries_a=entries(ra),
                               entries_b=entries(rb), codes_a=codes(ra), codes_b=codes(rb), all=all_names,
                               mine=solved[:])
        scheduling.prepare_module = real_prepare

        # a failure on one rank is raised on both, and both models are left as they were
        fresh, before = net(), None
        before = state(fresh)
        real_local = scheduling._solve_local

        def broken(*args, **kwargs):
            if rank == 1:
                raise RuntimeError("solver exploded on rank 1")
            yield from real_local(*args, **kwargs)

        scheduling._solve_local = broken
        try:
            compress_model(fresh, batches, bits=4, reduce_fn=reduce_fn, distributed=True)
        except RuntimeError as e:
            saved["failure"] = str(e)
        scheduling._solve_local = real_local
        saved["failure_intact"] = all(torch.equal(p, before[n]) for n, p in state(fresh).items())

        # the final check: a rank whose received weights were altered makes both ranks raise and restore
        real_broadcast = scheduling._broadcast

        def corrupt(t, src):
            real_broadcast(t, src)
            if rank == 1 and src == 0:
                t.view(-1)[0] += 1

        scheduling._broadcast = corrupt
        fresh = net()
        try:
            compress_model(fresh, batches, bits=4, reduce_fn=reduce_fn, distributed=True)
        except RuntimeError as e:
            saved["check"] = str(e)
        scheduling._broadcast = real_broadcast
        saved["check_intact"] = all(torch.equal(p, before[n]) for n, p in state(fresh).items())
        torch.save(saved, os.path.join(out, f"rank{{rank}}.pt"))
        dist.destroy_process_group()


    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
    """
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    script = out / "worker.py"
    script.write_text(WORKER.format(tests_dir=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", OBC_LIGHTNING_KERNELS="torch")
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=out, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one", "seq", "prune", "target"])
def test_sharded_weights_equal_on_both_ranks_and_to_everyone_solving_all(ranks, mode):
    r0, r1 = ranks[0][mode], ranks[1][mode]
    for name, p in r0["shared"].items():
        assert torch.equal(p, r1["shared"][name]), name  # the ranks agree ...
        assert torch.equal(p, r0["everyone"][name]), name  # ... with the unsharded result
        assert torch.equal(r0["everyone"][name], r1["everyone"][name]), name
    # report entries identical on both ranks (seconds too, the owner's, where a module was shared out;
    # sequential mode solves single-module passes on every rank, each timing its own) and equal to the
    # unsharded ones
    strip = [{**e, "seconds": 0} for e in r0["entries_a"]]
    if mode == "seq":
        assert [{**e, "seconds": 0} for e in r0["entries_b"]] == [{**e, "seconds": 0} for e in r1["entries_b"]]
        shared = [[e for e in r["entries_b"] if e["name"] in ("q", "k")] for r in (r0, r1)]
        assert shared[0] == shared[1]
    else:
        assert r0["entries_b"] == r1["entries_b"]
    assert [{**e, "seconds": 0} for e in r0["entries_b"]] == strip
    if mode == "target":  # every candidate width shared out, one decision: mixed widths, the same as unsharded
        assert len({e["bits"] for e in r0["entries_b"]}) > 1
    for name, cs in r0["codes_a"].items():
        for a, b, c in zip(cs, r0["codes_b"][name], r1["codes_b"][name]):
            assert torch.equal(a, b) and torch.equal(b, c), name
    # each rank solved its own share, together all of it, once
    mine0, mine1 = set(r0["mine"]), set(r1["mine"])
    if mode == "seq":  # only q and k share a pass (and so are shared out); every other module by both
        assert mine0 ^ mine1 == {"q", "k"}
    else:
        assert mine0 and mine1 and not mine0 & mine1 and mine0 | mine1 == set(r0["all"])


@pytest.mark.slow
def test_a_failing_rank_fails_both_and_a_bad_broadcast_is_caught(ranks):
    r0, r1 = ranks
    assert r1["failure"] == "solver exploded on rank 1"
    assert r0["failure"].startswith("compress_model: rank 1 failed while solving its share of the modules: "
                                    "RuntimeError: solver exploded on rank 1")
    for r in ranks:
        assert "ranks hold different quantized weights" in r["check"]
        assert r["failure_intact"] and r["check_intact"]


def test_shard_plan_is_longest_processing_time_first():
    costs = {"a": 3.0, "b": 5.0, "c": 3.0, "d": 4.0, "e": 3.0}
    # b -> 0; d -> 1; a -> 1 (4 < 5); c -> 0 (5 < 7); e -> 1 (7 < 8)
    assert shard_plan(costs, 2) == {"b": 0, "d": 1, "a": 1, "c": 0, "e": 1}
    assert shard_plan(costs, 1) == dict.fromkeys(costs, 0)
    assert set(shard_plan({"x": 1.0}, 4).values()) == {0}


def test_distributed_needs_a_process_group():
    from obc_lightning import compress_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="compress_model: distributed=True .* no process group is initialized"):
        compress_model(model, [torch.randn(8, 4)], distributed=True, reduce_fn=lambda t: None)
    with pytest.raises(ValueError, match="compress_model: distributed=True needs reduce_fn"):
        compress_model(model, [torch.randn(8, 4)], distributed=True)
    with pytest.raises(ValueError, match="compress_model: distributed must be a bool"):
        compress_model(model, [torch.randn(8, 4)], distributed="yes")
    assert torch.equal(model[0].weight, before)
