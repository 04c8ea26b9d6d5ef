"""Text-to-image upscaling (task=t2i_upscale): prompt sets, the weight preflight (one line naming every missing
component), the CLIP score, and an end-to-end run through a tiny random-weight SD pipeline of the real layout
(UNet, CLIP text encoder + tokenizer, DDIM scheduler, KL autoencoder) saved to a local folder."""
import json
import subprocess
import sys

import pytest
import torch

from upbench.data import DATASETS
from upbench.errors import UpbenchError

pytest.importorskip("diffusers", reason="text-to-image needs the optional package diffusers")
pytest.importorskip("transformers", reason="text-to-image needs the optional package transformers")

CHARS = "abcdefghijklmnopqrstuvwxyz'"


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(vocab)


def _text_config(vocab_size):
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny SD pipeline folder (the hub layout) and a tiny CLIP folder, random weights, seed 0."""
    import upbench  # noqa: F401  (torchvision fallback before diffusers imports it)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel)

    root = tmp_path_factory.mktemp("t2i")
    torch.manual_seed(0)
    tok, n_vocab = _tokenizer(root / "vocab")
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config(n_vocab))),
                                   tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    clip = CLIPModel(CLIPConfig(text_config=_text_config(n_vocab), projection_dim=16,
                                vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8)))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(root / "clip")
    return root


def _cfg(tmp_path, weights, *overrides, backbone="sd15_vae", dataset="demo_prompts"):
    from hydra import compose, initialize_config_module

    from upbench.runner import to_container

    vae = [f"backbone.name_or_path={weights / 'sd'}"] if backbone == "sd15_vae" else []
    data = ["dataset.num_prompts=3", "dataset.reference_size=96"] if dataset == "demo_prompts" else []
    with initialize_config_module(config_module="upbench.configs", version_base=None):
        return to_container(compose("config", [
            "task=t2i_upscale", f"backbone={backbone}", *vae,
            f"task.pipeline={weights / 'sd'}", f"task.clip_model={weights / 'clip'}", f"dataset={dataset}",
            *data, "task.base_size=64", "task.steps=2",
            "task.batch_size=2", "task.pfid_patch=64", f"paths.results={tmp_path}", *overrides]))


def test_prompt_sets(tmp_path):
    demo = DATASETS.create("demo_prompts", reference_size=48, num_prompts=2)
    assert len(demo) == 2 and demo.has_references and demo[0]["image"].shape == (3, 48, 48)
    assert "astronaut" in demo[0]["prompt"]
    (tmp_path / "p.txt").write_text("a red  car\n\n  a blue boat \n")
    pf = DATASETS.create("prompt_file", path=str(tmp_path / "p.txt"))
    assert [pf[i]["prompt"] for i in range(len(pf))] == ["a red car", "a blue boat"] and not pf.has_references
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2014").mkdir()
    from PIL import Image

    for i in (7, 3):
        Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(coco / "val2014" / f"im{i}.jpg")
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "im7.jpg"}, {"id": 3, "file_name": "im3.jpg"}],
        "annotations": [{"id": 5, "image_id": 7, "caption": "second\ncaption of 7"},
                        {"id": 2, "image_id": 7, "caption": "first caption of 7"},
                        {"id": 9, "image_id": 3, "caption": "a caption of 3"}]}))
    cc = DATASETS.create("coco_captions", root=str(coco), split="val2014", reference_size=16)
    assert [(cc[i]["id"], cc[i]["prompt"]) for i in range(2)] == [("3", "a caption of 3"), ("7", "first caption of 7")]
    assert cc.has_references and cc[1]["image"].shape == (3, 16, 16) and cc[1]["image"][0].mean() > 0.5
    (tmp_path / "pairs" / "a").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "pairs" / "a" / "x.png")
    (tmp_path / "pairs" / "a" / "x.txt").write_text("a black square\n")
    Image.new("RGB", (20, 20)).save(tmp_path / "pairs" / "no_caption.png")
    rl = DATASETS.create("relaion", root=str(tmp_path / "pairs"), reference_size=8)
    assert len(rl) == 1 and rl[0]["prompt"] == "a black square"
    with pytest.raises(UpbenchError, match="captions_val2014.json"):
        DATASETS.create("coco_captions", root=str(tmp_path / "nowhere"))


def test_missing_weights_are_named_in_one_line_before_anything_runs(tmp_path):
    """Offline with empty caches: the CLI exits 2 with one line naming the VAE, every pipeline component and CLIP."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
           "UPBENCH_RESULTS": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, "-m", "upbench.cli", "run", "task=t2i_upscale", "backbone=sd15_vae",
                           "dataset=demo_prompts", "upsampler=bilinear"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for name in ("VAE (vae)", "unet", "text_encoder", "tokenizer", "scheduler", "CLIP (clip)",
                 "stable-diffusion-v1-5/stable-diffusion-v1-5", "openai/clip-vit-large-patch14", "task.clip_model=null"):
        assert name in lines[0]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json"))


def test_missing_component_of_a_local_folder(tmp_path, tiny_weights):
    import shutil

    from upbench.runner import run_job

    partial = tmp_path / "partial"
    shutil.copytree(tiny_weights / "sd", partial)
    shutil.rmtree(partial / "unet")
    (partial / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(UpbenchError) as err:
        run_job(_cfg(tmp_path, tiny_weights, f"task.pipeline={partial}", "upsampler=bilinear"), log=lambda *_: None)
    msg = str(err.value)
    assert "SD1.5 text-to-image (unet, text_encoder)" in msg and str(partial) in msg and "VAE" not in msg


def test_clip_score_is_the_clamped_scaled_cosine(tiny_weights):
    from transformers import CLIPModel, CLIPProcessor

    from upbench.image_metrics import ClipScore

    scorer = ClipScore(str(tiny_weights / "clip"))
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, 48, generator=g) for _ in range(3)]
    prompts = ["a cat", "a dog on grass", "coffee"]
    got = scorer(images, prompts)
    # by hand, from the model's own embeddings of the processed inputs
    model, proc = CLIPModel.from_pretrained(str(tiny_weights / "clip")), CLIPProcessor.from_pretrained(str(tiny_weights / "clip"))
    arrays = [(im * 255).round().byte().permute(1, 2, 0).numpy() for im in images]
    inp = proc(text=prompts, images=arrays, return_tensors="pt", padding=True)
    with torch.no_grad():
        e_i = model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
        e_t = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).pooler_output
    want = [max(0.0, 100 * float(a @ b / (a.norm() * b.norm()))) for a, b in zip(e_i, e_t)]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(0 <= s <= 100 for s in got)


@pytest.mark.slow
def test_t2i_upscale_end_to_end_with_a_tiny_pipeline(tmp_path, tiny_weights):
    """64 px generations (latents 8x8) upscaled 2x to 128 px for two upsamplers; FID / p-FID / CLIP for the upscaled
    and the base images; the Tables 2-3 layout in the report. Images do not depend on the batch size."""
    from upbench import report
    from upbench.runner import run_job

    rows = {up: run_job(_cfg(tmp_path, tiny_weights, f"upsampler={up}"), log=lambda *_: None)
            for up in ("bilinear", "nearest")}
    for row in rows.values():
        m = row["metrics"]
        assert set(m) == {"fid", "pfid", "fid_base", "pfid_base", "clip", "clip_base"}
        assert all(v is not None and v >= 0 for v in m.values()) and m["clip"] <= 100
        assert row["data"]["out_size"] == 128 and row["data"]["scheduler"] == "DDIMScheduler"
        assert row["timing"]["upsampler_ms"] > 0
    b, n = rows["bilinear"]["metrics"], rows["nearest"]["metrics"]
    assert b["fid_base"] == pytest.approx(n["fid_base"], rel=1e-6)    # same prompts, same seeds, same base images
    assert b["fid"] != pytest.approx(n["fid"], rel=1e-3)
    one = run_job(_cfg(tmp_path, tiny_weights, "upsampler=bilinear", "task.batch_size=1"), log=lambda *_: None)
    assert one["metrics"]["fid"] == pytest.approx(b["fid"], rel=1e-4)
    md = report.render(list(rows.values()))
    assert "Text-to-image upscaling - VAE sd15_vae, base px 64, output px 128" in md and "Demo prompts CLIP" in md
    assert "no upscaling (64 px)" in md


def test_t2i_needs_the_sd_vae_and_a_prompt_set(tmp_path, tiny_weights):
    from upbench.runner import run_job

    with pytest.raises(UpbenchError, match="needs the SD1.5 VAE"):
        run_job(_cfg(tmp_path, tiny_weights, "upsampler=bilinear", backbone="taef2"), log=lambda *_: None)
    with pytest.raises(UpbenchError, match="needs a prompt set"):
        run_job(_cfg(tmp_path, tiny_weights, "upsampler=bilinear", dataset="demo_images"), log=lambda *_: None)
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(UpbenchError, match="no reference images for FID"):
        run_job(_cfg(tmp_path, tiny_weights, f"dataset.path={tmp_path / 'p.txt'}", "upsampler=bilinear",
                     dataset="prompt_file"), log=lambda *_: None)
