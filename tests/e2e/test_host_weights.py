"""The host weight cache: a stage loaded from it is the stage loaded from disk, tensor for tensor
and output for output, and its weights are the shared segment's pages (no copy)."""

import os

import pytest
import torch

from dfuse.engine.protocol import RequestParams
from dfuse.engine.transport.shm_files import list_segments, new_segment_prefix, unlink_segments
from dfuse.stages import weights
from dfuse.engine.models.tiny import tiny_model_path
from dfuse.engine.protocol import WorkerSpec
from dfuse.stages.worker import load_stage


@pytest.fixture
def cache(tmp_path):
    prefix = new_segment_prefix()
    weights.attach(prefix, str(tmp_path))
    yield prefix
    weights._cache = None
    unlink_segments(prefix)


def _spec(model: str, prefix: str, run_dir) -> WorkerSpec:
    return WorkerSpec(0, "encoder", str(tiny_model_path(model)), "cpu", "float32", 1, "", "", os.getpid(),
                      prefix, str(run_dir))


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_a_stage_from_the_cache_equals_the_stage_from_disk(model, cache, tmp_path):
    torch.set_num_threads(1)
    spec = _spec(model, cache, tmp_path)
    params = RequestParams("a red fox", "blurry", 2, 4.5, 64, 64, seed=3)
    inputs = {}
    for kind in ("encoder", "dit", "decoder"):
        from_disk = load_stage(spec, kind)  # publishes its components
        from_cache = load_stage(spec, kind)
        disk, cached = weights._modules(from_disk.model), weights._modules(from_cache.model)
        assert sorted(disk) == sorted(cached) and disk
        segments = {n: weights._cache._segments[weights._cache._key(n, torch.float32)] for n in disk}
        for name, module in disk.items():
            a, b = module.state_dict(), cached[name].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
            # Shared pages, not a copy: every parameter lies inside the component's segment.
            base = segments[name].data.data_ptr()
            assert all(base <= p.data_ptr() < base + segments[name].size for p in cached[name].parameters())
        # Bit for bit: the cache keeps each tensor's alignment, which CPU kernels depend on.
        out_disk = from_disk.run(inputs, params, lambda *_: None, None)
        out_cache = from_cache.run(inputs, params, lambda *_: None, None)
        assert out_disk.keys() == out_cache.keys()
        assert all(torch.equal(out_disk[k], out_cache[k]) for k in out_disk), kind
        inputs = out_disk
    assert all(n.startswith(cache) for n in list_segments(cache)) and list_segments(cache)


def test_without_a_cache_stages_load_from_disk(tmp_path):
    weights._cache = None
    stage = load_stage(_spec("tiny-sd3", new_segment_prefix(), tmp_path), "decoder")
    assert weights._modules(stage.model)  # loaded, and nothing published anywhere
    assert not (tmp_path / "weights").exists()
