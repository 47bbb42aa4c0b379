"""Tiny random diffusion models in diffusers format, built offline and deterministically.

Tests and benchmarks need models that go through the real loading code
(`from_pretrained(local_dir)`) without any model hub. The builders here write a complete
pipeline folder with random weights; the same builder version gives the same bytes every time.

Models: tiny-sd3, tiny-flux (guidance-embedded, like FLUX.1-dev), tiny-pixart (PixArt-Sigma) and
tiny-wan (Wan2.1 text-to-video).

Pitfalls handled (see shared FACTS.md):
- tokenizers are built by hand: the `tokenizers` trainers give different ids run to run;
- CLIP eos must not be id 2, or CLIP falls back to legacy argmax pooling;
- SD3 pads the CLIP embeddings up to the T5 width: T5 d_model < sum of CLIP widths silently
  truncates them, so T5 d_model == joint_attention_dim >= that sum;
- models built in memory are in train mode and T5 dropout defaults to 0.1: dropout 0, eval();
- Flux: the RoPE axes must add up to the attention head dim;
- Wan: the head dim is split 2*(d//6) + 2*(d//6) + rest over (height, width, frames) RoPE axes,
  so d = 12 gives three 4-wide axes; loading WanTransformer3DModel needs `accelerate`;
- each builder seeds every component itself, so adding a model never changes another's bytes.
"""
from __future__ import annotations

import grp
import os
import pathlib
import pwd
import shutil
import stat
import tempfile
import threading

# Builders seed torch's global RNG: two threads building at once would interleave it.
_BUILD_LOCK = threading.Lock()

# Bump whenever a builder's output changes: the cache folder name carries it.
BUILDER_VERSION = 2  # 2: dfuse.json serving defaults for tiny-flux and tiny-wan

# Words the tokenizers spell as one token each (others fall back to bytes / letters).
WORDS = (
    "a an the of in on at with and by red blue green white black yellow fox cat dog horse "
    "astronaut riding photo painting portrait snow forest city night sky sea mountain man "
    "woman tree house car sun moon flower bird small big high quality blurry"
).split()

CLIP_MAX_LEN = 77  # SD3 pipelines read tokenizer.model_max_length; CLIP positions match it.


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: 256 printable characters, in the canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _clip_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []  # tokenizers' BPE wants pairs, not "a b" strings
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        # Run the merges so far, then append merges joining what is left left-to-right. New merges
        # rank after all old ones, so words already spelled as one token keep their tokenization.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            tokens.append(a + b)
            pieces = [a + b] + pieces[2:]
    # Specials at the end as in the real CLIP vocab, so eos is never id 2.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_tokenizer(pad_token: str | None):
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_merges()
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LEN, **kwargs)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # Unigram picks the segmentation with the best total score: whole words beat letters.
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -6.0) for c in letters]
    # extra_ids=0: no sentinel tokens; SD3 reads 256 tokens, T5 itself has no length limit.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_encoder(seed: int, tokenizer, hidden: int, proj: int, act: str, with_projection: bool = True):
    """CLIPTextModelWithProjection (SD3) or CLIPTextModel (Flux: pooler output only)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        projection_dim=proj, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LEN, hidden_act=act, dropout=0.0, attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert config.eos_token_id != 2  # else legacy argmax pooling
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _t5_encoder(seed: int, tokenizer, d_model: int):
    """A T5 v1.1 encoder (gated-gelu), as SD3, Flux and PixArt use; dropout 0 (default 0.1)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2,
        num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )).eval()


def _vae(seed: int, latent_channels: int, scaling: float, shift: float | None, quant_conv: bool):
    """AutoencoderKL with the real x8 downscale (4 blocks) and the family's latent statistics."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),  # 4 blocks: the real x8 downscale
        layers_per_block=1, norm_num_groups=32, sample_size=128,
        scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv,  # SD3/Flux: none; SDXL's VAE: both
    ).eval()


# SD3 "tiny" sizes. Pooled text = concat of the two CLIP projections; the joint text sequence
# is the CLIP hidden states (concatenated, zero-padded to the T5 width) followed by T5.
SD3_CLIP_WIDTHS = (32, 32)  # hidden == projection dim, as in CLIP-L / CLIP-G
SD3_T5_DIM = 64  # >= sum(SD3_CLIP_WIDTHS)


def _locked(build, out_dir: pathlib.Path) -> None:
    import torch

    with _BUILD_LOCK, torch.random.fork_rng():  # leave the caller's RNG state alone
        build(out_dir)


def build_tiny_sd3(out_dir: pathlib.Path) -> None:
    assert SD3_T5_DIM >= sum(SD3_CLIP_WIDTHS)
    _locked(_build_tiny_sd3, out_dir)


def _build_tiny_sd3(out_dir: pathlib.Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok1 = _clip_tokenizer(None)
    tok2 = _clip_tokenizer("!")  # SD3's second CLIP tokenizer pads with "!"
    tok3 = _t5_tokenizer()
    w1, w2 = SD3_CLIP_WIDTHS
    te1 = _clip_encoder(1, tok1, w1, w1, "quick_gelu")  # CLIP-L uses quick_gelu
    te2 = _clip_encoder(2, tok2, w2, w2, "gelu")  # CLIP-G uses gelu

    te3 = _t5_encoder(3, tok3, SD3_T5_DIM)

    torch.manual_seed(4)
    transformer = SD3Transformer2DModel(
        sample_size=16,  # latent size: default image 128 px
        patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=16, num_attention_heads=4,  # inner dim 64
        joint_attention_dim=SD3_T5_DIM, caption_projection_dim=64,  # must equal the inner dim
        pooled_projection_dim=w1 + w2,
        pos_embed_max_size=64,  # 64 patches * 2 * 8 = up to 1024 px images
    ).eval()

    vae = _vae(5, 16, scaling=1.5305, shift=0.0609, quant_conv=False)  # SD3 VAE latent statistics

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
        text_encoder_3=te3, tokenizer_3=tok3,
    )
    # Models built from configs are float32 already; no pipe.to(dtype) (it warns, changes nothing).
    pipe.save_pretrained(out_dir, safe_serialization=True)


# Flux "tiny" sizes. Pooled text = CLIP's pooler output; the text sequence is T5's alone (512
# tokens, FluxPipeline's max_sequence_length default).
FLUX_CLIP_WIDTH = 32
FLUX_T5_DIM = 32


def build_tiny_flux(out_dir: pathlib.Path) -> None:
    _locked(_build_tiny_flux, out_dir)


def _build_tiny_flux(out_dir: pathlib.Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok1, tok2 = _clip_tokenizer(None), _t5_tokenizer()
    te1 = _clip_encoder(11, tok1, FLUX_CLIP_WIDTH, FLUX_CLIP_WIDTH, "quick_gelu", with_projection=False)
    te2 = _t5_encoder(12, tok2, FLUX_T5_DIM)

    torch.manual_seed(13)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64,  # 16 latent channels packed 2x2 by the pipeline
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=FLUX_T5_DIM, pooled_projection_dim=FLUX_CLIP_WIDTH,
        guidance_embeds=True,  # FLUX.1-dev style: the guidance scale is an input, no CFG batch
        axes_dims_rope=(4, 6, 6),  # RoPE axes (text, row, column) must add up to the head dim
    ).eval()

    vae = _vae(14, 16, scaling=0.3611, shift=0.1159, quant_conv=False)  # Flux VAE latent statistics
    # FLUX.1's scheduler config: the shift mu grows with the image's token count (256 -> 4096).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # FluxPipeline's default is 1024 px whatever the model: 128 px like the other tiny models.
    _write_serving_defaults(out_dir, height=128, width=128)


PIXART_T5_DIM = 32


def build_tiny_pixart(out_dir: pathlib.Path) -> None:
    _locked(_build_tiny_pixart, out_dir)


def _build_tiny_pixart(out_dir: pathlib.Path) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(21, tokenizer, PIXART_T5_DIM)

    torch.manual_seed(22)
    transformer = PixArtTransformer2DModel(
        sample_size=16,  # latent size: default image 128 px (no resolution binning at this size)
        patch_size=2, in_channels=4, out_channels=8,  # learned sigma: the pipeline keeps half
        num_layers=2, attention_head_dim=16, num_attention_heads=2,
        cross_attention_dim=32,  # == the inner dim
        caption_channels=PIXART_T5_DIM,
        use_additional_conditions=False,  # as PixArt-Sigma: no resolution/aspect micro-conditions
    ).eval()

    vae = _vae(23, 4, scaling=0.13025, shift=None, quant_conv=True)  # SDXL's VAE, as PixArt-Sigma
    # PixArt-Sigma's scheduler config (DPM-Solver++ 2M, linear betas, epsilon prediction).
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="epsilon", lower_order_final=True, timestep_spacing="linspace",
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


WAN_T5_DIM = 32


def build_tiny_wan(out_dir: pathlib.Path) -> None:
    _locked(_build_tiny_wan, out_dir)


def _build_tiny_wan(out_dir: pathlib.Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    # Wan's UMT5 tokenizer is a T5 (SentencePiece Unigram) tokenizer; WanPipeline loads it with
    # AutoTokenizer, which the hand-built T5 one satisfies.
    tokenizer = _t5_tokenizer()
    torch.manual_seed(31)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=WAN_T5_DIM, d_kv=16, d_ff=2 * WAN_T5_DIM, num_layers=2, num_heads=2,
        dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )).eval()

    torch.manual_seed(32)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16,  # Wan2.1: 16 latent channels
        num_attention_heads=2, attention_head_dim=12,  # RoPE axes 4 + 4 + 4
        text_dim=WAN_T5_DIM, freq_dim=32, ffn_dim=48, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    ).eval()

    torch.manual_seed(33)
    # Wan2.1's VAE layout (x8 space, x4 time, 16 latent channels, its latent mean/std) at a
    # tenth of the width: base_dim 96 -> 8.
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()

    # Wan2.1's default scheduler in diffusers: UniPC over flow-matching sigmas, shift 3 (480p).
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # WanPipeline's defaults (81 frames of 832x480) are a 90 MiB video: 9 frames at Wan's aspect.
    _write_serving_defaults(out_dir, num_frames=9, height=64, width=112)


def _write_serving_defaults(out_dir: pathlib.Path, **defaults) -> None:
    """dfuse.json (engine/models: SERVING_DEFAULTS): what requests that leave these unset get."""
    import json

    (out_dir / "dfuse.json").write_text(json.dumps({"defaults": defaults}, indent=2) + "\n")


TINY_MODELS = {
    "tiny-sd3": build_tiny_sd3, "tiny-flux": build_tiny_flux, "tiny-pixart": build_tiny_pixart,
    "tiny-wan": build_tiny_wan,
}


def cache_dir() -> pathlib.Path:
    env = os.environ.get("DFUSE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "dfuse"


class UntrustedCacheError(PermissionError):
    """A folder of the dfuse cache could be changed by another user: dfuse will not load models from it."""


# Why refuse rather than quietly build somewhere else: the engine loads whatever weights, configs
# and tokenizers sit in the cache, so a folder another user can change is a folder whose images
# they choose. pip disables its cache when the folder is not the current user's
# (check_path_owner) and git refuses repositories owned by someone else (safe.directory);
# huggingface_hub trusts its cache whoever wrote it. dfuse cannot do without its cache as pip
# can, and a private subfolder inside a shared folder has a predictable name that another user
# can create first, so, like git, it refuses with the folder, the owner and the fix. What is
# checked is who can *change* each folder from / down to the model's files, not what they hold:
# once nobody else can write there, what was checked is what the workers load.


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group_is_only(gid: int, owner: int) -> bool:
    """Whether the owner is the one and only member of group `gid`: a user-private group, which
    umask 002 systems make group-writable everything in (the rule Debian's OpenSSH applies to
    ~/.ssh). An unknown group, or one without members, is not: who is in it cannot be told."""
    try:
        group, owner_name = grp.getgrgid(gid), pwd.getpwuid(owner).pw_name
    except KeyError:
        return False
    primary = {user.pw_name for user in pwd.getpwall() if user.pw_gid == gid}
    members = primary | set(group.gr_mem)
    return members == {owner_name}


def _write_problem(path: pathlib.Path, sticky_protects: bool) -> str | None:
    """Why another user could change `path` (None if only this user or root can).

    `sticky_protects`: a folder where dfuse only looks up names it then checks itself (the
    cache, models/) is safe when writable by others with the sticky bit (/tmp): they can add
    entries but not replace this user's. Inside a model folder it is not: diffusers and dfuse
    read optional files (dfuse.json, extra components) whose mere presence changes the model."""
    # Root can change anything anyway. As root trust only root, as pip does: a root process
    # (`sudo` keeping $HOME) must not load what an ordinary user left in its cache.
    trusted = {os.geteuid(), 0}
    link = os.lstat(path)
    if link.st_uid not in trusted:  # whoever owns a symlink can replace it, even in a sticky folder
        return f"is owned by {_owner(link.st_uid)}"
    st = os.stat(path)
    if st.st_uid not in trusted:
        return f"is owned by {_owner(st.st_uid)}"
    if sticky_protects and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & stat.S_IWOTH:
        return f"is writable by every user ({mode})"
    if st.st_mode & stat.S_IWGRP and not _group_is_only(st.st_gid, st.st_uid):
        try:
            group = f"group {grp.getgrgid(st.st_gid).gr_name}"
        except KeyError:
            group = f"group {st.st_gid}"
        return f"is writable by {group}, which other users may be in ({mode})"
    return None


def _folders_down_to(path: pathlib.Path) -> list[pathlib.Path]:
    """/, then each folder down to `path`: whoever can write one can swap everything below it.
    Both the path as given and with its symlinks resolved, since both are walked to reach it."""
    folders: list[pathlib.Path] = []
    for p in (pathlib.Path(os.path.abspath(path)), pathlib.Path(os.path.realpath(path))):
        for folder in [*reversed(p.parents), p]:
            if folder not in folders:
                folders.append(folder)
    return folders


def cache_problem(model_dir: pathlib.Path | None = None) -> tuple[pathlib.Path, str] | None:
    """The first folder or file that another user could change, and why: the folders down to
    the cache, its models/ folder, then everything in `model_dir`. None when all are safe;
    missing ones are skipped (they are made by this user on first use)."""
    root = cache_dir()
    candidates = [(folder, True) for folder in _folders_down_to(root / "models")]
    if model_dir is not None:
        candidates.append((model_dir, False))
        for folder, subfolders, files in os.walk(model_dir):
            candidates += [(pathlib.Path(folder) / name, False) for name in subfolders + files]
    for path, sticky_protects in candidates:
        try:
            problem = _write_problem(path, sticky_protects)
        except FileNotFoundError:
            continue
        if problem:
            return path, problem
    return None


def _refuse_untrusted(problem: tuple[pathlib.Path, str], name: str) -> None:
    path, why = problem
    env = os.environ.get("DFUSE_CACHE")
    where = f"DFUSE_CACHE={env}" if env else f"the dfuse cache {cache_dir()} (DFUSE_CACHE is unset)"
    models = cache_dir() / "models"
    if models in path.parents:  # the folders above it are safe (checked first): a rebuild replaces it
        fix = f"rebuild it with `dfuse models build-tiny --name {name} --rebuild`"
    elif why.startswith("is owned"):
        fix = "set DFUSE_CACHE to a folder only you can write (the default is ~/.cache/dfuse)"
    else:
        fix = f"make it yours alone (`chmod go-w {path}`) or set DFUSE_CACHE to a folder only you can write"
    raise UntrustedCacheError(
        f"{where}: not loading {name} from it: {path} {why}, so another user could change the model; {fix}")


def _drop_write_for_others(root: pathlib.Path) -> None:
    """Make a freshly built model folder writable by this user only, whatever the umask: a
    folder someone else could write is refused when it is next used (cache_problem)."""
    for folder, _, files in os.walk(root):
        for path in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def tiny_model_path(name: str = "tiny-sd3", rebuild: bool = False) -> pathlib.Path:
    """Path of the tiny model `name`, built on first use. Safe with concurrent callers.
    UntrustedCacheError when another user could change the folder (see cache_problem)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODELS)}")
    models = cache_dir() / "models"
    final = models / f"{name}-v{BUILDER_VERSION}"
    if problem := cache_problem():  # before making anything in a folder that is not ours
        _refuse_untrusted(problem, name)
    # 0755 whatever the umask, for the folders this call makes (their parents keep the umask's).
    cache_dir().mkdir(mode=0o755, parents=True, exist_ok=True)
    models.mkdir(mode=0o755, exist_ok=True)
    if problem := cache_problem():  # and the ones just made (or made by someone else meanwhile)
        _refuse_untrusted(problem, name)
    if rebuild and final.exists():
        # Move aside first (atomic), so no reader ever sees a half-deleted folder.
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=models))
        try:
            os.rename(final, trash / "m")
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    if not final.is_dir():  # only ever appears complete: it is renamed into place
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=models))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            TINY_MODELS[name](tmp)
            _drop_write_for_others(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # lost the race: the winner's folder is there and equivalent
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op when the rename succeeded
    if problem := cache_problem(final):
        _refuse_untrusted(problem, name)
    return final
