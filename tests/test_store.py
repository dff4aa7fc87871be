import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from docl_flower.core.store import META_FILE, TENSORS_FILE, content_hash, load_filter, save_filter

from .conftest import random_registration


def test_saved_filter_round_trips_with_metadata(tmp_path):
    rng = np.random.default_rng(0)
    regs = [random_registration(rng, u, u) for u in range(3)]
    save_filter(tmp_path / "f", regs, extra={1: {"node_id": 42}}, info={"note": "x"})
    loaded, meta = load_filter(tmp_path / "f")
    assert [(r.user_id, r.label, r.err_mean, r.err_std) for r in loaded] == [
        (r.user_id, r.label, r.err_mean, r.err_std) for r in regs
    ]
    for a, b in zip(regs, loaded, strict=True):
        assert content_hash(a.params) == content_hash(b.params)
    assert meta["entries"][1]["node_id"] == 42 and meta["note"] == "x"


def test_a_tampered_tensor_fails_its_content_hash(tmp_path):
    rng = np.random.default_rng(0)
    save_filter(tmp_path, [random_registration(rng, 0, 0)])
    tensors = load_file(str(tmp_path / TENSORS_FILE))
    tensors["0/decoder.bias"][0] += 1.0
    save_file(tensors, str(tmp_path / TENSORS_FILE))
    with pytest.raises(ValueError, match="hash"):
        load_filter(tmp_path)


def test_unknown_format_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    save_filter(tmp_path, [random_registration(rng, 0, 0)])
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["format"] = 99
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        load_filter(tmp_path)
