import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quantum.callbacks import ModelExport, QuantizationAwareTraining
from lightning_quantum.models import Classifier, DigitsMLP
from lightning_quantum.precision import torch_dtype
from lightning_quantum.quantization import load_program, load_safetensors
from tests.conftest import trainer_kwargs


@pytest.mark.parity
def test_exports_the_converted_model_and_keeps_earlier_files(tmp_path, digits):
    torch.manual_seed(0)
    model = Classifier(DigitsMLP(hidden=(32,), dropout=0.0))
    export = ModelExport(output_dir=tmp_path)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[QuantizationAwareTraining(), export]))
    trainer.fit(model, digits)
    assert sorted(p.name for p in tmp_path.glob("model.*")) == ["model.pt2", "model.safetensors"]
    x = next(iter(digits.test_dataloader()))[0][:7]
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(load_program(tmp_path / "model.pt2")(x), expected)
        fresh = load_safetensors(Classifier(DigitsMLP(hidden=(32,), dropout=0.0)), tmp_path / "model.safetensors")
        torch.testing.assert_close(fresh.eval()(x), expected)
    trainer.test(model, digits, verbose=False)  # the exported model is still usable in Lightning
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[ModelExport(output_dir=tmp_path)])).fit(
        Classifier(DigitsMLP(hidden=(32,))), digits
    )
    assert len(list(tmp_path.glob("model.*.safetensors"))) == 1  # the first export was kept, renamed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"formats": ["onnx"]}, r"`formats` entry 'onnx' is not valid. Choose from: 'safetensors', 'pt2'"),
        ({"formats": "pt2"}, r"`formats`='pt2' is not valid. Give a list"),
        ({"stem": "a/b"}, r"`stem`='a/b' is not valid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        ModelExport(**kwargs)


def test_torch_dtype_allow_list():
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match=r"`dtype`='os.system' is not valid. Choose one of: 'float32'"):
        torch_dtype("os.system")
