"""The mIoU metric against hand-computed cases, the model for each backbone and head layout, and
checkpoints."""
import math

import pytest
import torch

import common


def test_confusion_matrix_by_hand():
    # Truth:      0 0 1 1 255     Prediction: 0 1 1 1 2
    target = torch.tensor([0, 0, 1, 1, 255])
    prediction = torch.tensor([0, 1, 1, 1, 2])
    confusion = common.ConfusionMatrix(3)
    confusion.update(target, prediction)
    # class 0: intersection 1, union 2; class 1: intersection 2, union 3; class 2: never present.
    iou = confusion.iou()
    assert iou[0] == pytest.approx(50.0) and iou[1] == pytest.approx(200 / 3) and math.isnan(iou[2])
    assert confusion.miou() == pytest.approx((50 + 200 / 3) / 2)


def test_confusion_sums_over_the_set_not_per_image():
    confusion = common.ConfusionMatrix(2)
    confusion.update(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))  # 4/4
    confusion.update(torch.tensor([1, 0]), torch.tensor([0, 0]))  # class 1: 0/1
    # Summed: class 1 IoU 4/5 (a mean of per-image IoUs would say 50); class 0: 1/2.
    assert confusion.iou() == pytest.approx([50.0, 80.0])


def test_a_class_predicted_but_absent_counts_as_zero():
    confusion = common.ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 0]), torch.tensor([0, 2]))
    assert confusion.iou()[2] == 0.0 and confusion.miou() == pytest.approx(25.0)
    report = confusion.report(["a", "b", "c"])
    assert report["per_class"]["b"] is None and report["miou"] == pytest.approx(25.0)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "mobilenet_v3_large", "tiny_unet"])
@pytest.mark.parametrize("aux_head", [None, "separate", "shared"])
def test_model_outputs_for_each_backbone_and_head_layout(backbone, aux_head):
    torch.manual_seed(0)
    model = common.build_model(backbone, 5, pretrained=False, aux_head=aux_head).eval()
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5, 33, 47)
        if aux_head:
            main, aux = model(x, with_aux=True)
            assert torch.allclose(main, out) and aux.shape == out.shape
            assert not torch.allclose(aux, out)  # a head of its own
    if aux_head == "separate":
        # ĝ: its own copy of the last stage, starting from the same weights.
        assert model.aux_last_stage is not model.last_stage
        for a, b in zip(model.aux_last_stage.parameters(), model.last_stage.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    else:
        assert model.aux_last_stage is None
    n_heads = len(model.head_parameters())
    assert n_heads and len(model.backbone_parameters()) + n_heads == len(list(model.parameters()))


def test_resnet_backbone_runs_at_output_stride_8():
    model = common.build_model("resnet50", 3, pretrained=False).eval()
    with torch.no_grad():
        assert model.last_stage(model.lower(torch.randn(1, 3, 64, 64))).shape[-2:] == (8, 8)


def test_no_aux_head_means_no_aux_output():
    with pytest.raises(ValueError):
        common.build_model("tiny_unet", 3, pretrained=False)(torch.randn(1, 3, 16, 16), with_aux=True)


def test_tiny_unet_has_no_pretrained_weights():
    with pytest.raises(common.UserError, match="--no-pretrained"):
        common.build_model("tiny_unet", 3, pretrained=True)


def test_checkpoints_are_written_atomically_and_loaded_safely(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    model = common.build_model("tiny_unet", 3, pretrained=False)
    common.save_checkpoint(path, {"model": model.state_dict(), "args": {"backbone": "tiny_unet"}, "labeled": ["a"],
                                  "unlabeled": [], "class_names": ["x", "y", "z"], "step": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    rebuilt = common.model_from_checkpoint(common.load_checkpoint(path), path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


class Arbitrary:
    pass


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model": Arbitrary(), "args": {}}, path)
    with pytest.raises(common.UserError, match="cannot be loaded with weights_only=True"):
        common.load_checkpoint(path)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(common.UserError, match="not a checkpoint of this project"):
        common.load_checkpoint(foreign)
