"""``attn_implementation="flash_attention_2"``: transformers' FA2 code path with flash-attn's entry points replaced by
an exact PyTorch reference (flash_reference.py), so the parts that differ from sdpa run on a CPU: the 2-D padding
mask instead of a 4-D one, unpadding into variable-length sequences, a single sequence whose position ids have gaps
(transformers then derives its boundaries from the position ids), and the decode step's bottom-right causal mask."""
import pytest
import torch

import vtr

import flash_reference
from conftest import BATCH, _model
from test_contract import hooks_on
from tiny_models import make_inputs


def test_the_reference_path_runs_and_equals_sdpa_on_the_stock_model(model, flash_model, batch, single):
    assert flash_model.config.text_config._attn_implementation == "flash_attention_2"
    flash_reference.calls.clear()
    for inputs in (batch, single):
        with torch.no_grad():
            torch.testing.assert_close(flash_model(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    assert flash_reference.calls["varlen"] > 0 and flash_reference.calls["dense"] > 0


def test_tome_in_the_tower_under_flash_attention_2():
    """Proportional attention is an additive bias, which FA2 cannot take: refused before the model is touched; without
    it, ToMe in the tower runs the FA2 path and matches sdpa."""
    sdpa, flash = _model("llava", "sdpa"), _model("llava", "flash_attention_2")
    batch = make_inputs(sdpa, BATCH, seed=2)
    hooks = hooks_on(flash)
    with pytest.raises(ValueError, match="proportional attention .* flash_attention_2 cannot take: pass prop_attn"):
        vtr.patch(flash, "tome", r=4)
    assert hooks_on(flash) == hooks
    logits = []
    for m in (sdpa, flash):
        with vtr.patch(m, "tome", r=4, prop_attn=False), torch.no_grad():
            logits.append(m(**batch).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
