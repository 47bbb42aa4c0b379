"""Link selection: which transport joins two stages, decided from where each side lives."""

import pytest

from dfuse.engine.transport.base import Place, choose_link, pool_kind

CPU = Place("cpu")
GPU_A = Place("cuda:0", "GPU-aaaa")
GPU_A_AGAIN = Place("cuda:1", "GPU-aaaa")  # same GPU seen under another index (CUDA_VISIBLE_DEVICES)
GPU_B = Place("cuda:1", "GPU-bbbb")


def peers(*pairs):
    allowed = {frozenset(p) for p in pairs}
    return lambda a, b: frozenset((a.uuid, b.uuid)) in allowed


@pytest.mark.parametrize(
    "producer,consumer,peer_access,link",
    [
        (CPU, CPU, peers(), "shm"),
        (CPU, GPU_A, peers(), "shm"),  # the GPU consumer copies host -> device
        (GPU_A, CPU, peers(), "shm"),  # the GPU producer copies device -> host
        (GPU_A, GPU_A, peers(), "cuda_ipc"),
        (GPU_A, GPU_A_AGAIN, peers(), "cuda_ipc"),  # identity is the UUID, not the index
        (GPU_A, GPU_B, peers(("GPU-aaaa", "GPU-bbbb")), "cuda_p2p"),
        (GPU_A, GPU_B, peers(), "host_staged"),  # e.g. H100 + L4, consumer cards: no P2P
    ],
)
def test_choose_link(producer, consumer, peer_access, link):
    assert choose_link(producer, consumer, peer_access) == link


@pytest.mark.parametrize(
    "links,kind",
    [(["cuda_ipc"], "cuda"), (["cuda_ipc", "cuda_p2p"], "cuda"), (["cuda_ipc", "host_staged"], "shm"),
     (["shm"], "shm"), ([], "shm")],
)
def test_pool_lives_on_the_gpu_only_if_every_consumer_reads_gpu_memory(links, kind):
    assert pool_kind(links) == kind


@pytest.mark.parametrize("policy, links, gpu_pools", [
    ("static", {"encoder->dit": "cuda_ipc", "dit->decoder": "cuda_p2p", "decoder->engine": "shm"}, ["dit", "encoder"]),
    ("elastic", {"encoder->dit": "host_staged", "dit->decoder": "host_staged", "decoder->engine": "shm"}, []),
])
def test_an_elastic_engine_keeps_every_output_in_host_memory_where_moves_can_take_it(monkeypatch, policy, links,
                                                                                    gpu_pools):
    """Two GPUs with P2P: a static engine keeps outputs on the GPU for its consumers (IPC, P2P);
    an elastic one stages them all through host memory, so no worker's outputs die with it or
    stop it from moving."""
    import torch

    from dfuse.engine import worker_layout
    from dfuse.engine.config import EngineConfig, TransportConfig
    from dfuse.engine.transport.shm_files import new_segment_prefix, unlink_segments

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(worker_layout, "_probe", lambda workers, cluster: {"cuda:0": GPU_A, "cuda:1": GPU_B})
    monkeypatch.setattr(worker_layout, "cuda_peer_access", peers(("GPU-aaaa", "GPU-bbbb")))
    config = EngineConfig(model="synthetic:encoder=1ms,dit=1ms,decoder=1ms", devices=["cuda:0", "cuda:1"],
                          placement={"cuda:0": ["encoder", "dit"], "cuda:1": ["decoder"]}, policy=policy,
                          transport=TransportConfig(slot_mib=1))
    assert worker_layout.choose_links(config.workers, None, config.gpu_pools) == links
    prefix = new_segment_prefix()
    try:
        workers = worker_layout.build_workers(config, prefix)
        assert sorted(w.stage for w in workers.values() if w.pool.on_gpu) == gpu_pools
    finally:
        unlink_segments(prefix)
