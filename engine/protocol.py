"""Wire messages between the engine and its stage workers: msgspec structs, nothing else.

Every message is a tagged struct encoded with msgpack; receivers decode against the union of the
types they accept, so an unknown or malformed frame is a `msgspec.ValidationError`/`DecodeError`,
never code execution (no pickle on any socket). Tensors never travel inside a message: a message
carries `TensorRef`s into a shared-memory slot.
"""

from __future__ import annotations

import msgspec

_STRUCT = dict(tag=True, array_like=True, omit_defaults=True, forbid_unknown_fields=True, gc=False)


class TensorRef(msgspec.Struct, **_STRUCT):
    """One tensor inside a transport pool: where it starts, its shape and dtype."""

    name: str
    pool: str  # pool name: a shared-memory segment, or a CUDA pool announced by a PoolInfo
    offset: int  # byte offset inside the pool
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"


class OutputSlot(msgspec.Struct, **_STRUCT):
    """Where a stage must write its outputs: a byte range of a pool reserved for this task."""

    pool: str
    offset: int
    nbytes: int


class CudaIpcHandle(msgspec.Struct, **_STRUCT):
    """What `UntypedStorage._share_cuda_()` returns, as plain fields (never pickled)."""

    device_index: int  # in the producer's numbering; consumers locate the GPU by uuid
    handle: bytes
    size: int
    offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class PoolInfo(msgspec.Struct, **_STRUCT):
    """A producer's GPU slot pool, exported once per link (not per tensor)."""

    name: str
    device_uuid: str
    slot_bytes: int
    n_slots: int
    memory: CudaIpcHandle
    slot_events: list[bytes]  # one interprocess event per slot: recorded after the producer writes


class WorkerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker process needs to start: written once to its stdin when the engine spawns it
    (engine/launcher.py), never sent over a socket, never on its command line."""

    worker_id: int
    stage: str
    model_path: str
    device: str  # the engine's name of its device: "cuda:N", "cpu", a core set "cpu:0-3" (engine/devices.py)
    dtype: str  # torch dtype name
    cpu_threads: int
    task_endpoint: str  # the engine binds a PUSH socket here for this worker (another node's: tcp://ITS_IP, it binds)
    result_endpoint: str  # the engine's PULL socket shared by all workers
    engine_pid: int
    segment_prefix: str  # the engine's segments: unlinked by any worker that outlives it
    run_dir: str  # the engine's private socket directory: removed likewise
    gpu_pool: tuple[str, int, int] | None = None  # (name, slot bytes, slots): outputs stay on this GPU
    cpus: tuple[int, ...] | None = None  # cores of its own (engine/cpu_affinity.py); None: the OS places it
    variant: str | None = None  # which weight files to load (diffusers' variant: "fp16"); None: the plain ones
    generation: int = 0  # how many processes this worker has had (engine/core.py _spawn), this one included
    secret: str | None = None  # hex, on a cluster: signs reads of other nodes' pools, and every frame of a TCP task socket
    task_session: str | None = None  # hex: the engine-side signer session its TCP task socket accepts frames of
    cpu_share: int = 0  # on another node's whole host (NODE/cpu): workers sharing its cores; its agent sets cpu_threads


class RequestParams(msgspec.Struct, **_STRUCT):
    """What a stage needs to know about one request; validated by the engine before it runs."""

    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int
    vae_tiling: bool = False  # decode in tiles: set by memory admission when a full decode won't fit
    true_cfg_scale: float = 1.0  # Flux true CFG: a second forward with the negative prompt when > 1
    num_frames: int = 1  # video families (Wan): frames to generate; image families: always 1


class StageTask(msgspec.Struct, **_STRUCT):
    """Engine -> worker: run this stage for one request, read `inputs`, write into `output`."""

    request_id: int
    params: RequestParams
    inputs: list[TensorRef]
    output: OutputSlot
    report_progress: bool = False


class StageBatch(msgspec.Struct, **_STRUCT):
    """Engine -> worker: run this stage for several compatible requests as one call (per-stage
    batching). Each task keeps its own output slot; the worker answers one StageDone (or
    StageFailed) per task, so the engine's bookkeeping stays per request."""

    tasks: list[StageTask]


class OpenPool(msgspec.Struct, **_STRUCT):
    """Engine -> consumer worker: map this producer's GPU pool (sent before any task reads it)."""

    pool: PoolInfo


class RemotePool(msgspec.Struct, **_STRUCT):
    """Engine -> worker: this pool lives on another node; read it from the slot server at `address`
    (transport/tcp.py). Sent before any task that reads it, on the same socket."""

    name: str
    address: str


class ClosePool(msgspec.Struct, **_STRUCT):
    """Engine -> every worker: a stopped producer's host pool is gone; unmap it (its pages are
    freed once no process maps it)."""

    name: str


class CancelTask(msgspec.Struct, **_STRUCT):
    """Engine -> worker: the caller cancelled this request or its deadline passed. The worker
    stops it at the next denoising step (or skips it if it has not started) and answers with
    StageFailed, which releases its slots."""

    request_id: int


class Become(msgspec.Struct, **_STRUCT):
    """Engine -> drained worker: unload your stage, load `stage` in this same process, then say
    READY again (a move between stages: no process start, no imports, the output pool stays)."""

    stage: str


class Ready(msgspec.Struct, **_STRUCT):
    """Worker -> engine: weights are loaded, tasks may come."""

    worker_id: int
    pid: int
    load_s: float
    pool: PoolInfo | None = None  # set by producers on a GPU whose consumers map GPU memory
    task_address: str | None = None  # a worker on another node: where it bound its task socket (tcp://...)
    generation: int = 0  # its WorkerSpec's: a READY from a replaced process is told apart (over TCP it may come late)


class LoadFailed(msgspec.Struct, **_STRUCT):
    """Worker -> engine: the stage could not load (bad model folder, out of memory ...)."""

    worker_id: int
    error: str


class StageTimings(msgspec.Struct, **_STRUCT):
    """Seconds spent by one worker on one task."""

    queued_s: float  # received by the worker -> compute started
    compute_s: float  # forward pass, including writing outputs into the slot
    batch_size: int = 1  # requests computed together in that call (compute_s is the whole call's)
    fetch_s: float = 0.0  # of compute_s: getting the inputs from the producer's slot (the handoff)
    stages: dict[str, float] = {}  # a fused worker's compute_s per pipeline stage (empty otherwise)


class StageDone(msgspec.Struct, **_STRUCT):
    """Worker -> engine: outputs are in the task's output slot; its inputs may be released."""

    worker_id: int
    request_id: int
    outputs: list[TensorRef]
    timings: StageTimings
    warnings: list[str] = []  # for the request's caller, e.g. a prompt cut to its text encoder's length


class StageFailed(msgspec.Struct, **_STRUCT):
    """Worker -> engine: the task raised; the worker stays up and takes the next task, unless
    `replace_me`: its device is unusable (a CUDA fault), it computes nothing more and waits for
    the engine to replace it. The engine kills it only after reading this, so the request's own
    error reaches the caller instead of a "worker died" retry. `inputs_unreachable`: the task's
    inputs on another node could not be read (that node may have left before the engine saw it):
    the request's fault is not shown, so it starts over rather than fails."""

    worker_id: int
    request_id: int
    error: str
    replace_me: bool = False
    inputs_unreachable: bool = False


class Progress(msgspec.Struct, **_STRUCT):
    """Worker -> engine: `step` of `total` steps done (the DiT reports its denoising steps)."""

    worker_id: int
    request_id: int
    step: int
    total: int


HEARTBEAT_INTERVAL_S = 1.0  # how often a ready worker says it is alive (engine/recovery.py: liveness)


class Heartbeat(msgspec.Struct, **_STRUCT):
    """Worker -> engine, every HEARTBEAT_INTERVAL_S from a thread of its own: the process runs
    (a SIGSTOPped or wedged one falls silent), and whether its compute still moves."""

    worker_id: int
    stalled_s: float  # seconds the compute loop has held a task without a step or an end (0: idle)


class WorkerLog(msgspec.Struct, **_STRUCT):
    """Worker on another node -> engine: what it logged at WARNING or above (on the engine's host
    a worker's stderr is the engine's; there it would stay in Ray's log files on that node)."""

    worker_id: int
    level: int  # logging's: 30 WARNING, 40 ERROR, 50 CRITICAL
    text: str


ToWorker = StageTask | StageBatch | OpenPool | RemotePool | ClosePool | Become | CancelTask
ToEngine = Ready | LoadFailed | StageDone | StageFailed | Progress | Heartbeat | WorkerLog

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


class _Decoder:
    """A msgpack decoder bound to the union a receiver accepts: anything else is rejected.

    Every malformed frame raises msgspec.DecodeError/ValidationError; msgspec itself lets
    invalid UTF-8 out as UnicodeDecodeError, which would slip past the receivers' handlers.
    """

    def __init__(self, accepted):
        self._decoder = msgspec.msgpack.Decoder(accepted)

    def decode(self, frame: bytes):
        try:
            return self._decoder.decode(frame)
        except UnicodeDecodeError as e:
            raise msgspec.DecodeError(f"invalid UTF-8 in a string field: {e}") from None


worker_decoder = _Decoder(ToWorker)
engine_decoder = _Decoder(ToEngine)


_spec_encoder = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(WorkerSpec)


def encode_spec(spec: WorkerSpec) -> bytes:
    return _spec_encoder.encode(spec)


def decode_spec(data: bytes) -> WorkerSpec:
    return _spec_decoder.decode(data)
