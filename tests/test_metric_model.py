"""The mIoU metric against hand-computed cases, the model for each backbone and head layout, and
checkpoints."""
import argparse
import math

import pytest
import torch

import common
import training
import outputs


def optimizer_args():
    return argparse.Namespace(lr=0.01, head_lr_mult=10.0, optimizer="sgd", weight_decay=0.0, warmup=0, iters=10)


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


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "tiny_unet"])
@pytest.mark.parametrize("aux_head", [None, "separate", "shared"])
def test_model_outputs_for_each_backbone_and_head_layout(backbone, aux_head):
    torch.manual_seed(0)
    model = common.build_model(backbone, 5, weights="none", aux_head=aux_head).eval()
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5, 33, 47)
        if aux_head:
            main, aux = model(x, with_aux=True)
            assert torch.allclose(main, out) and aux.shape == out.shape
            assert not torch.allclose(aux, out)  # a head of its own
    assert (model.aux_last_stage is not None) == (aux_head == "separate")
    backbone_group, heads_group = training.make_optimizer(model, optimizer_args())[0].param_groups
    assert heads_group["params"] and len(backbone_group["params"]) + len(heads_group["params"]) == len(list(model.parameters()))


def last_stage_width(stage, x):
    with torch.no_grad():
        return stage(x).shape[1]


@pytest.mark.parametrize("backbone,width", [("resnet50", 2048), ("resnet101", 2048), ("tiny_unet", 16)])
def test_separate_head_is_a_new_half_width_last_stage_in_the_heads_group(backbone, width):
    """ĝ as the authors built it: a new, randomly initialised last stage half as wide as the
    main one, fed by the stage before, with its own head, trained at the heads' learning rate."""
    torch.manual_seed(0)
    model = common.build_model(backbone, 5, weights="none", aux_head="separate").eval()
    lower = model.lower(torch.randn(1, 3, 40, 40))
    assert last_stage_width(model.last_stage, lower) == width
    assert last_stage_width(model.aux_last_stage, lower) == width // 2
    main_weights = {p.data_ptr() for p in model.last_stage.parameters()}
    assert not main_weights & {p.data_ptr() for p in model.aux_last_stage.parameters()}
    if backbone.startswith("resnet"):  # three torchvision Bottlenecks of 256 planes, dilated like layer4
        from torchvision.models.resnet import Bottleneck
        blocks = list(model.aux_last_stage)
        assert len(blocks) == 3 and all(isinstance(b, Bottleneck) for b in blocks)
        assert [b.conv2.dilation for b in blocks] == [(2, 2), (4, 4), (4, 4)]
        assert blocks[0].conv1.in_channels == 1024 and blocks[-1].conv3.out_channels == 1024
    optimizer, _ = training.make_optimizer(model, optimizer_args())
    backbone_group, heads_group = optimizer.param_groups
    heads = {id(p) for p in heads_group["params"]}
    assert heads_group["lr"] == pytest.approx(0.1) and backbone_group["lr"] == pytest.approx(0.01)
    assert {id(p) for p in model.aux_last_stage.parameters()} <= heads
    assert {id(p) for p in model.aux_head.parameters()} <= heads and {id(p) for p in model.head.parameters()} <= heads
    assert not {id(p) for p in model.last_stage.parameters()} & heads


def test_separate_stage_is_initialised_from_scratch_not_from_the_pretrained_stage():
    torch.manual_seed(0)
    first = common.build_model("resnet50", 3, weights="none", aux_head="separate")
    torch.manual_seed(1)
    second = common.build_model("resnet50", 3, weights="none", aux_head="separate")
    conv = first.aux_last_stage[0].conv1.weight
    assert not torch.equal(conv, second.aux_last_stage[0].conv1.weight)  # random, per seed
    assert conv.std().item() == pytest.approx((2 / conv.shape[0]) ** 0.5, rel=0.1)  # Kaiming, fan-out, as torchvision's ResNet
    assert torch.equal(first.aux_last_stage[0].bn1.weight, torch.ones(256))


def test_resnet_backbone_runs_at_output_stride_8():
    model = common.build_model("resnet50", 3, weights="none").eval()
    with torch.no_grad():
        assert model.last_stage(model.lower(torch.randn(1, 3, 64, 64))).shape[-2:] == (8, 8)


def test_no_aux_head_means_no_aux_output():
    with pytest.raises(ValueError):
        common.build_model("tiny_unet", 3, weights="none")(torch.randn(1, 3, 16, 16), with_aux=True)


def test_tiny_unet_has_no_pretrained_weights():
    with pytest.raises(common.UserError, match="--no-pretrained"):
        common.build_model("tiny_unet", 3, weights="imagenet")


def test_checkpoints_are_written_atomically_and_loaded_safely(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    model = common.build_model("tiny_unet", 3, weights="none")
    outputs.atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "args": {"backbone": "tiny_unet"},
                                                      "labeled": ["a"], "unlabeled": [], "class_names": ["x", "y", "z"],
                                                      "step": 1}, tmp))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    checkpoint, found = outputs.load_checkpoint(str(tmp_path))  # a run folder stands for its checkpoint.pt
    assert found == path
    rebuilt = common.model_from_checkpoint(checkpoint, path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


class Arbitrary:
    pass


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model": Arbitrary(), "args": {}}, path)
    with pytest.raises(common.UserError, match="cannot be loaded with weights_only=True"):
        outputs.load_checkpoint(path)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(common.UserError, match="not a checkpoint of this project"):
        outputs.load_checkpoint(foreign)


def test_coco_weights_without_network_give_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(common.torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(common.torchvision.models.segmentation, "deeplabv3_resnet50", offline)
    with pytest.raises(common.UserError, match="cannot download the coco weights .*--no-pretrained"):
        common.build_model("resnet50", 21, weights="coco")


def test_coco_weights_give_the_backbone_of_torchvisions_coco_deeplab(monkeypatch):
    """--weights coco: the backbone of torchvision's COCO-trained DeepLabv3, the heads fresh."""
    torch.manual_seed(0)
    coco = common.torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)
    captured = {}

    def builder(weights=None):
        captured["weights"] = weights
        return coco
    monkeypatch.setattr(common.torchvision.models.segmentation, "deeplabv3_resnet50", builder)
    model = common.build_model("resnet50", 21, weights="coco")
    assert captured["weights"].name == "COCO_WITH_VOC_LABELS_V1"
    assert model.last_stage is coco.backbone["layer4"] and model.lower[-1] is coco.backbone["layer3"]
    assert not any(p is q for p in model.head.parameters() for q in coco.classifier.parameters())
