"""Data-parallel training through torch.distributed: two CPU processes (gloo) running
DistributedDataParallel or FSDP2 over fusedlm's BERT get the gradients a single process computes
for the same two half-batches; and `fusedlm pretrain` under torchrun."""
import gc
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedlm.models as fm

CONFIG = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40)


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, 101, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 1:6:2] = ids[:, 1:6:2]
    return ids, mask, labels, torch.tensor([0, 1])


def _model():
    torch.manual_seed(0)
    return fm.BertForPreTraining(fm.BertConfig(**CONFIG, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0))


def _packed_step(rank, world=2):
    """This rank's first step from fusedlm.packing (its share of the steps)."""
    from fusedlm.packing import PackedBatchSampler, PackingCollator
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 13, (20,), generator=g).tolist()
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 101, (n,), generator=g)
        labels = torch.full((n,), -100)
        labels[1::3] = ids[1::3]
        samples.append(dict(input_ids=ids, labels=labels, next_sentence_label=i % 2))
    sampler = PackedBatchSampler(lengths, tokens=48, max_sequences=10, max_seqlen=16,
                                 num_replicas=world, rank=rank, seed=1)
    step = next(iter(sampler))
    return PackingCollator(tokens=48, max_sequences=10, max_seqlen=16)([samples[i] for i in step])


def _loss(model, rank, layout="padded"):
    if layout == "packed":
        return model(**_packed_step(rank)).loss
    ids, mask, labels, nsp = _batch(rank)
    return model(ids, mask, labels=labels, next_sentence_label=nsp).loss


def _wrap(model, how):
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # FSDP2: parameters sharded per layer
    # A CPU mesh: without one FSDP2 takes the GPU when there is one, and these are gloo processes.
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank, world, port, out, how, layout):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _wrap(_model(), how)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. FSDP2's warning about view outputs
            _loss(model, rank, layout).backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2 shards
            grads[n.replace("module.", "")] = g
        if rank == 0:
            torch.save(grads, out)
    finally:
        # FSDP2's modules sit in reference cycles that hold gloo work objects: freed by the
        # collector at interpreter exit, after the group is gone, they can abort the process
        # ("terminate called without an active exception", seen once in the full suite).
        model = grads = None
        gc.collect()
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("how, layout", [("ddp", "padded"), ("fsdp2", "padded"), ("ddp", "packed"),
                                         ("fsdp2", "packed")])
def test_data_parallel_gradients_equal_a_single_process(tmp_path, how, layout):
    """DistributedDataParallel and FSDP2 (fully_shard per encoder layer) over fusedlm's BERT, on
    padded batches and on fusedlm.packing's static-shape packed steps (each rank its share)."""
    if how == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2").fully_shard
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), how, layout), nprocs=2, join=True)
    got = torch.load(out)
    model = _model()
    # DDP averages the ranks' gradients.
    ((_loss(model, 0, layout) + _loss(model, 1, layout)) / 2).backward()
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-5 * scale), (n, (got[n] - p.grad).abs().max(), scale)


def test_pretrain_under_torchrun_two_processes(tmp_path):
    """`fusedlm pretrain` launched by torchrun on two CPU processes (gloo, DDP): it trains, rank 0
    reports for both, and the two implementations still follow the same curve."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    import json
    import subprocess
    import sys
    args = ["pretrain", "--steps", "6", "--finetune-steps", "3", "--batch", "8", "--hidden", "32",
            "--heads", "2", "--docs", "60", "--vocab", "200", "--no-progress", "--dtype", "fp32"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "fusedlm.cli", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
                         timeout=300)  # CPU processes, also on a machine with one GPU
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("masked-LM accuracy") == 1  # one report, from rank 0
    r = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert r["processes"] == 2 and r["curves_agree"]
    curve = r["results"]["fused"]["curve"]
    assert len(curve) == 6 and all(abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"]
                                   for a, b in zip(curve, r["results"]["reference"]["curve"]))
