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
