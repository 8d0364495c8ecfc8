"""`fednano generate`: free-form answers from a tuned run, in process.

Greedy decoding through FedNano's parts (the NanoEdge with trained adapters, the frozen LLM with its
KV cache, every generated token through NanoAdapter-T) must give the tokens transformers' own
`generate` gives on the run's export.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fednano.backbones.bundle import load_nanoedge
from fednano.backbones.prepare import ensure_prepared
from fednano.backbones.tiny import build_tiny_llava
from fednano.cli import app
from fednano.config import load_config
from fednano.data.easyvqa import SYSTEM_PROMPT, load_image, load_split
from fednano.data.prompts import IMAGE_PLACEHOLDER, prompt_batch
from fednano.export import export_model
from fednano.generate import generate_ids, load_tuned
from fednano.split.endpoint import Decoding
from fednano.split.frames import Frame
from tests.conftest import TINY, randomize_adapters


def _run(tmp_path, cfg, scale=0.3):
    """A results folder as `fednano run` leaves it (config + final adapters), adapters trained (non-zero)."""
    edge = load_nanoedge(ensure_prepared(cfg) / "client", cfg.adapter).edge
    randomize_adapters(edge, scale=scale)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    save_file(edge.adapter_state(), run / "adapters.safetensors")
    return run, edge


def test_greedy_answers_equal_transformers_generate_on_the_export(tiny_cache, tmp_path, monkeypatch):
    """...and `fednano generate EXPORT_DIR` (the folder split into client and server parts again) gives them too."""
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setenv("FEDNANO_CACHE", str(tiny_cache))
    ckpt = build_tiny_llava(tmp_path / "llava")
    cfg = load_config(TINY, {"model.cache_dir": str(tiny_cache), "model.backbone": "llava", "model.checkpoint": str(ckpt)})
    run, edge = _run(tmp_path, cfg, scale=3.0)  # adapters strong enough that the tiny random model's answers vary
    tuned = load_tuned(run, "cpu")
    exported = export_model(cfg, edge.adapter_state(), tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    from_export = load_tuned(exported, "cpu")
    for s in list(load_split("test"))[:3]:
        ours = generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=8))
        assert generate_ids(from_export, s.content(), [s.image_path], Decoding(max_new_tokens=8)) == ours
        batch = prompt_batch(tuned.tokenizer, [s.content()], edge.num_visual_tokens, SYSTEM_PROMPT)
        ids = batch.input_ids.masked_fill(batch.input_ids == IMAGE_PLACEHOLDER, hf.config.image_token_id)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, pixel_values=edge.vision.preprocess(load_image(s.image_path)[None]),
                              attention_mask=batch.attention_mask, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
        ref = ref[:ref.index(tuned.tokenizer.eos_token_id)] if tuned.tokenizer.eos_token_id in ref else ref
        assert ours == ref and len(set(ours)) >= 4  # several different tokens: each one's embedding mattered


def test_an_exported_composed_folder_answers_like_its_run(tiny_cfg, tiny_bundle, tmp_path):
    run, edge = _run(tmp_path, tiny_cfg, scale=3.0)
    tuned, from_export = load_tuned(run, "cpu"), load_tuned(export_model(tiny_cfg, edge.adapter_state(), tmp_path / "export"), "cpu")
    assert from_export.system == tuned.system == SYSTEM_PROMPT  # the export records the task's system prompt
    answers = []
    for s in list(load_split("test"))[:3]:
        answers.append(generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6)))
        assert generate_ids(from_export, s.content(), [s.image_path], Decoding(max_new_tokens=6)) == answers[-1]
    assert len({t for a in answers for t in a}) >= 3  # not one repeated token: the adapters shaped the answers


def test_a_feddpa_clients_own_model_answers_from_its_run_and_from_its_export(tiny_cfg, tiny_bundle, tmp_path):
    """The LoRA family: the run's global LoRA plus client 0's personal LoRA, active in the LLM (run) or
    merged into it (export), give the same answers; --client on an export is refused."""
    from fednano.export import ExportError, export_run
    from tests.test_export import _lora_run

    _, run, _ = _lora_run(tmp_path, tiny_cfg, "feddpa-f", scale=1.0)
    own, glob = load_tuned(run, "cpu", client=0), load_tuned(run, "cpu")
    exported = load_tuned(export_run(run, tmp_path / "export", client=0), "cpu")
    differs = False
    for s in list(load_split("test"))[:3]:
        ids = generate_ids(own, s.content(), [s.image_path], Decoding(max_new_tokens=6))
        assert generate_ids(exported, s.content(), [s.image_path], Decoding(max_new_tokens=6)) == ids
        differs |= generate_ids(glob, s.content(), [s.image_path], Decoding(max_new_tokens=6)) != ids
    assert differs  # the personal LoRA changed some answer
    with pytest.raises(ExportError, match="--client applies to a run"):
        load_tuned(tmp_path / "export", "cpu", client=0)


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(tiny_cfg, tiny_bundle, tmp_path):
    run, _ = _run(tmp_path, tiny_cfg)
    tuned = load_tuned(run, "cpu")
    s = load_split("test")[0]
    greedy = generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6))
    assert generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6, temperature=1.0, top_p=1e-6)) == greedy
    a = generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6, temperature=5.0, seed=1))
    assert a == generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6, temperature=5.0, seed=1))
    others = [generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6, temperature=5.0, seed=k)) for k in range(2, 6)]
    assert any(o != a for o in others)  # at temperature 5 over a random model, seeds disagree


def test_fednano_generate_answers_one_question_and_a_file(tiny_cfg, tiny_bundle, tmp_path):
    run, _ = _run(tmp_path, tiny_cfg)
    samples = list(load_split("test"))[:3]
    res = CliRunner().invoke(app, ["generate", str(run), "--prompt", samples[0].question, "--image", samples[0].image_path,
                                   "--max-new-tokens", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    requests = tmp_path / "questions.jsonl"
    requests.write_text("".join(json.dumps({"id": f"q{i}", "prompt": s.question, "image": s.image_path}) + "\n"
                                for i, s in enumerate(samples)))
    out = tmp_path / "answers.jsonl"
    res = CliRunner().invoke(app, ["generate", str(run), "--input", str(requests), "--output", str(out), "--max-new-tokens", "4",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["q0", "q1", "q2"] and all(isinstance(x["answer"], str) for x in lines)


@pytest.mark.parametrize(("content", "needle"), [
    ('{"prompt": "ok"}\nnot json\n', "questions.jsonl:2: not valid JSON"),
    ('{"image": "x.png"}\n', "questions.jsonl:1: each line needs a string 'prompt'"),
    ('{"prompt": "what?", "image": "missing.png"}\n', "questions.jsonl:1: image file not found"),
])
def test_fednano_generate_names_the_bad_line_of_an_input_file(tiny_cfg, tiny_bundle, tmp_path, content, needle):
    run, _ = _run(tmp_path, tiny_cfg)
    (tmp_path / "questions.jsonl").write_text(content)
    res = CliRunner().invoke(app, ["generate", str(run), "--input", str(tmp_path / "questions.jsonl"), "--device", "cpu"])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["generate", str(run)])
    assert res.exit_code == 2 and "give --prompt" in res.output
    res = CliRunner().invoke(app, ["generate", str(run), "--prompt", "hi", "--temperature", "1", "--top-p", "0"])
    assert res.exit_code == 2 and "--top-p must be in (0, 1]" in res.output


# ------------------------------------------------------------------ through the split channel
def test_generation_through_the_split_channel_equals_in_process_and_is_one_round_trip(tiny_cfg, tiny_bundle, tmp_path):
    from fednano.split.client import SplitClient
    from fednano.split.server import SplitServer

    run, _ = _run(tmp_path, tiny_cfg, scale=3.0)
    tuned = load_tuned(run, "cpu")
    with SplitServer(tuned.llm) as server, SplitClient(server.address, wire_dtype="float32") as client:
        for s in list(load_split("test"))[:3]:
            local = generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=8))
            frames = server.service.stats["frames"]
            assert generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=8), endpoint=client) == local
            assert server.service.stats["frames"] == frames + 1  # the whole answer in one request
        sampled = [generate_ids(tuned, s.content(), [s.image_path], Decoding(max_new_tokens=6, temperature=2.0, seed=3), endpoint=e)
                   for e in (client, None)]
        assert sampled[0] == sampled[1]
        assert client.bytes_up["generate"] > 0 and client.bytes_down["generate"] > 0  # counted like every op


@pytest.mark.parametrize("backbone", ["tiny", "llava", "blip2"])
def test_prompts_decoded_together_get_the_answers_each_gets_alone(tiny_cache, tmp_path, backbone):
    """Batched decoding (prompts of different lengths, padded, moved to the left with their positions)
    gives every prompt the tokens it gets decoded alone, in process and through the split channel."""
    from fednano.backbones.tiny import build_tiny_blip2
    from fednano.split.client import SplitClient
    from fednano.split.server import SplitServer

    sets = {"model.cache_dir": str(tiny_cache)}
    if backbone != "tiny":
        builder = build_tiny_llava if backbone == "llava" else build_tiny_blip2
        sets |= {"model.backbone": backbone, "model.checkpoint": str(builder(tmp_path / backbone))}
    run, edge = _run(tmp_path, load_config(TINY, sets), scale=3.0)
    tuned = load_tuned(run, "cpu")
    questions = ["what shape is it?", "is there a circle in the image at all, or not?", "color?"]
    samples = list(load_split("test"))[:3]
    contents = [f"<image>\n{q}" for q in questions]
    alone = [generate_ids(tuned, c, [s.image_path], Decoding(max_new_tokens=8)) for c, s in zip(contents, samples, strict=True)]
    batch = prompt_batch(tuned.tokenizer, contents, edge.num_visual_tokens, tuned.system)
    assert len(set(batch.attention_mask.sum(1).tolist())) == 3  # three lengths: two prompts padded
    with torch.no_grad():
        x = tuned.edge.embed(batch.input_ids, tuned.features([s.image_path for s in samples]))
    args = (x, batch.attention_mask, tuned.edge.text_adapter(), [tuned.tokenizer.eos_token_id], Decoding(max_new_tokens=8))
    assert tuned.llm.generate(*args) == alone and len({t for a in alone for t in a}) >= 3
    with SplitServer(tuned.llm) as server, SplitClient(server.address, wire_dtype="float32") as client:
        assert client.generate(*args) == alone


def _generate_frame(d, vocab, **change):
    tensors = {"embeds": torch.randn(1, 5, d), "mask": torch.ones(1, 5, dtype=torch.uint8),
               "adapter_t_A": torch.zeros(2, d), "adapter_t_B": torch.zeros(d, 2)}
    meta = {"scale": 2.0, "stop": [0], "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    for k, v in change.items():
        (tensors if isinstance(v, torch.Tensor) else meta)[k] = v
    return Frame("generate", tensors, meta)


@pytest.mark.parametrize(("change", "needle"), [
    ({"embeds": torch.randn(2, 5, 32), "mask": torch.tensor([[1, 1, 0, 0, 0], [0] * 5], dtype=torch.uint8)},
     "sequences must be right-padded and non-empty"),
    ({"adapter_t_A": torch.zeros(2, 7)}, "expected (r, 32) and (32, r)"),
    ({"adapter_t_B": torch.full((32, 2), float("nan"))}, "contains NaN or Inf"),
    ({"max_new_tokens": 0}, "meta.max_new_tokens must be an integer in [1, 1024]"),
    ({"max_new_tokens": 100000}, "meta.max_new_tokens must be an integer in [1, 1024]"),
    ({"temperature": -1.0}, "meta.temperature must be a number >= 0"),
    ({"top_p": 0.0}, "meta.top_p must be a number in (0, 1]"),
    ({"stop": [10**9]}, "meta.stop must be a list of token ids"),
    ({"seed": "x"}, "meta.seed must be a non-negative integer"),
])
def test_malformed_generate_requests_are_refused_and_the_server_keeps_serving(tiny_llm, change, needle):
    from fednano.split.client import SplitChannelError, SplitClient
    from fednano.split.server import SplitServer

    d, vocab = tiny_llm.hidden_size, tiny_llm.vocab_size
    assert d == 32
    with SplitServer(tiny_llm) as server, SplitClient(server.address, wire_dtype="float32") as client:
        with pytest.raises(SplitChannelError, match="INVALID_ARGUMENT") as err:
            client.request(_generate_frame(d, vocab, **change))
        assert needle in str(err.value)
        ok = client.request(_generate_frame(d, vocab))  # the same stream goes on
        assert ok.op == "generate" and ok.tensors["tokens"].numel() <= 4
