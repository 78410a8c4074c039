"""The merge an export makes (`worker.training.merge`) and the export's process (`worker.training.export`), on a
tiny random Llama with real NF4 quantisation: the NF4 round trip is the recipe's, the merge into those weights
matches the model as trained where the naive 4-bit merge does not, an adapter of another base is refused, the
merge's memory is bounded by a shard, and the exported folder loads with plain transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import ROOT, chat, python_m, write_jsonl
from worker.training.merge import MergeError, Quantisation, merge
from worker.training.model import attach_lora, compute_dtype, load_base_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(base, adapter): the tiny Llama under NF4 with a LoRA whose B is not zero, saved as the recipe saves it."""
    folder = tmp_path_factory.mktemp("trained")
    model = attach_lora(load_base_model(tiny_model), 8, 16, 0.0, TARGETS)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    model.save_pretrained(folder / "adapter")
    return tiny_model, folder / "adapter"


def as_trained(base: Path, adapter: Path):
    from worker.training.model import load_adapter_weights

    model = attach_lora(load_base_model(base), 8, 16, 0.0, TARGETS)
    load_adapter_weights(model, adapter)
    return model.eval()


@torch.no_grad()
def test_merge_into_the_nf4_weights_matches_the_model_as_trained(trained, tmp_path):
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, adapter = trained
    reference = as_trained(base, adapter)
    original = load_file(str(base / "model.safetensors"))
    quantisation = Quantisation(input_dtype=compute_dtype())
    layers = [(n, m) for n, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linear layers in each of 2 blocks: the output layer stays 16-bit
    for name, layer in layers:
        key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
        # The weights the layer multiplies by, in float32: what it makes of the identity. (bitsandbytes' own
        # dequantize_4bit rounds them to the dtype they were quantised from: on a bf16 CPU, not these.)
        compute, layer.compute_dtype = layer.compute_dtype, torch.float32
        recipe = layer(torch.eye(layer.in_features)).t()
        layer.compute_dtype = compute
        assert torch.equal(quantisation.round_trip(original[key]), recipe), key  # bit for bit

    ids = torch.randint(0, 2000, (2, 48))
    expected = reference(input_ids=ids).logits.float()
    deltas = {}
    for base_weights in ("nf4", "original"):
        info = merge(base, adapter, tmp_path / base_weights, "float32", base_weights, quantisation, shard_bytes=2**20)
        assert info["merged_weights"] == 8 and info["shards"] > 1
        assert info["requantised_weights"] == (14 if base_weights == "nf4" else 0)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / base_weights, dtype=torch.float32).eval()
        deltas[base_weights] = float((merged(input_ids=ids).logits - expected).abs().max())
    # What merge_and_unload does on a 4-bit model: the merged weight rounded back to 4 bits.
    naive = as_trained(base, adapter).merge_and_unload()
    deltas["naive"] = float((naive(input_ids=ids).logits.float() - expected).abs().max())
    assert deltas["nf4"] < 0.05, deltas  # what is left is the reference's bf16 (or float32) arithmetic
    assert deltas["nf4"] * 5 < deltas["original"] and deltas["nf4"] * 5 < deltas["naive"], deltas


def test_an_adapter_of_another_base_is_refused(trained, tmp_path, tokenizer_dir):
    from tests.support import build_tiny_model

    base, adapter = trained
    wider = build_tiny_model(tokenizer_dir, tmp_path / "wider", **{"hidden_size": 96, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})  # fmt: skip
    with pytest.raises(
        MergeError,
        match=r"update of model.layers.0.self_attn.k_proj.weight is \(32, 64\), the base.s weight \(48, 96\)",
    ):
        merge(wider, adapter, tmp_path / "out", "bfloat16", "original")
    config = json.loads((adapter / "adapter_config.json").read_text())
    strange = tmp_path / "strange"
    strange.mkdir()
    (strange / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(MergeError, match="only LoRA adapters merge"):
        merge(base, strange, tmp_path / "out2", "bfloat16", "original")


MEASURED_MERGE = """
import json, sys, threading, time
from pathlib import Path
from worker.training.merge import merge, quantised_layer_weights

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

base, adapter, out = map(Path, sys.argv[1:4])
quantised_layer_weights(base)  # the libraries it needs, loaded before measuring
before, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
info = merge(base, adapter, out, "float32", "nf4", shard_bytes=8 * 2**20)
done.set()
sampler.join()
print(json.dumps({"grew": peak[0] - before, **info}))
"""


def test_the_merge_holds_a_shard_not_the_model(tmp_path):
    """Two models, 8 and 24 blocks (100 and 290 MB in float32), merged with shards of 8 MB: the process's own
    memory (its anonymous pages; the base's file pages are the kernel's to drop) grows by the same ~80 MB for
    both (the libraries' first use, one shard, the tensors being merged), not with the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    grew = {}
    for blocks in (8, 24):
        shape = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=blocks, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=1024)  # fmt: skip
        folder = tmp_path / str(blocks)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(folder / "base")
        lora = get_peft_model(LlamaForCausalLM(LlamaConfig(**shape)), LoraConfig(r=8, target_modules=TARGETS))
        lora.save_pretrained(folder / "adapter")
        del lora
        result = subprocess.run(
            [sys.executable, "-c", MEASURED_MERGE, str(folder / "base"), str(folder / "adapter"), str(folder / "out")],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        measured = json.loads(result.stdout.splitlines()[-1])
        assert measured["merged_weights"] == 4 * blocks and measured["shards"] * 8 * 2**20 >= measured["bytes"]
        grew[measured["bytes"]] = measured["grew"]
    (small, small_grew), (large, large_grew) = sorted(grew.items())
    assert large > 2.5 * small and large_grew < 128 * 2**20, grew
    assert large_grew - small_grew < 16 * 2**20, grew  # 190 MB more model, no more memory


def test_the_export_process_writes_a_loadable_folder_with_its_fidelity(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = trained
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"Say {i}", f"Squawk! {i}. Squawk!") for i in range(24)])
    config = {"base_model_path": str(base), "train_file": str(data), "lora_r": 8, "lora_alpha": 16, "seed": 3,
              "dataset_sha256": "x", "job_id": "ftjob-test", "base_model_id": "tiny-llama"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(config))

    def export(*options: str) -> subprocess.CompletedProcess:
        args = ["--config", str(tmp_path / "cfg.json"), "--adapter", str(adapter), "--out", str(tmp_path / "out")]
        return python_m("worker.training.export", [*args, *options])

    result = export("--dtype", "float16", "--shard-mb", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed["passed"] is True and printed["summary"].startswith("Merged 8 LoRA weights into the nf4 base")
    folder = tmp_path / "out" / "model"
    manifest = json.loads((folder / "tunequeue_export.json").read_text())
    fidelity = manifest["fidelity"]
    assert manifest["job_id"] == "ftjob-test" and manifest["export"]["dtype"] == "float16"
    assert fidelity["examples"] == 1 and fidelity["examples_from"] == "validation" and fidelity["positions"] > 0
    assert fidelity["loss_drift"] < 0.01 and fidelity["max_abs_logit_delta"] < 0.1 and fidelity["mean_kl"] < 1e-3
    assert fidelity["greedy_matches"] == len(fidelity["samples"]) == 1
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(base).chat_template
    assert (folder / "generation_config.json").is_file()
    # Out of its bounds: the figures are written, and the process says it did not pass.
    failed = export("--max-loss-drift", "0", "--base-weights", "original")
    assert failed.returncode == 0 and json.loads(failed.stdout.splitlines()[-1])["passed"] is False


def test_a_gguf_export_loads_back_with_its_chat_template(trained, tmp_path):
    """An f16 GGUF written by the export loads with transformers (`gguf_file=`), within the fidelity bound, with
    RoPE's base, the chat template and the special tokens unchanged and an Ollama Modelfile beside it (q8_0: the
    real stack's test, tests/integration/test_flow.py); and it imports back."""
    import shutil

    from gguf import GGUFReader

    base, adapter = trained
    # RoPE's base away from its default: it must reach the GGUF (transformers 5 keeps it in `rope_parameters`).
    base = shutil.copytree(base, tmp_path / "base", ignore=shutil.ignore_patterns(".quantised"))
    model_config = json.loads((base / "config.json").read_text())
    rope = model_config.get("rope_parameters") or {"rope_type": "default"}
    (base / "config.json").write_text(json.dumps({**model_config, "rope_parameters": {**rope, "rope_theta": 50000.0}}))
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"Say {i}", f"Squawk! {i}. Squawk!") for i in range(24)])
    config = {"base_model_path": str(base), "train_file": str(data), "lora_r": 8, "lora_alpha": 16, "seed": 3,
              "dataset_sha256": "x", "job_id": "ftjob-test"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    for quantization in ("f16",):
        out = tmp_path / quantization
        result = python_m(
            "worker.training.export",
            ["--config", str(tmp_path / "cfg.json"), "--adapter", str(adapter), "--out", str(out),
             "--format", "gguf", "--quantization", quantization],
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.splitlines()[-1])["passed"] is True
        folder = out / "model"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"ftjob-test-{quantization}.gguf", "Modelfile", "tunequeue_export.json"]
        )
        manifest = json.loads((folder / "tunequeue_export.json").read_text())
        assert manifest["export"]["chat_template_round_trip"] is True and manifest["export"]["tokenizer_pre"] == "gpt2"
        assert manifest["fidelity"]["max_abs_logit_delta"] < 0.01
        reader = GGUFReader(folder / f"ftjob-test-{quantization}.gguf")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == quantization.upper() and types["blk.0.attn_norm.weight"] == "F32"
        assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
        assert reader.fields["llama.rope.freq_base"].contents() == 50000.0
        modelfile = (folder / "Modelfile").read_text()
        assert (
            modelfile.startswith(f"FROM ./ftjob-test-{quantization}.gguf")
            and 'PARAMETER stop "<|im_end|>"' in modelfile
        )

    # Imported back as the demo's GGUF is (`worker.training.gguf_import`): the file parsed once for the config, the
    # tokenizer and the weights, the same chat template, and the gguf package as it was afterwards.
    import gguf

    from worker.training.gguf_import import import_gguf

    parses, reader = [], gguf.GGUFReader
    counting = lambda *args, **kwargs: parses.append(args) or reader(*args, **kwargs)  # noqa: E731
    gguf.GGUFReader = counting
    try:
        import_gguf(folder / "ftjob-test-f16.gguf", tmp_path / "imported")
        assert len(parses) == 1 and gguf.GGUFReader is counting
    finally:
        gguf.GGUFReader = reader
    imported = tmp_path / "imported"
    assert json.loads((imported / "config.json").read_text())["num_hidden_layers"] == model_config["num_hidden_layers"]
    assert (imported / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()


def test_only_bases_llama_cpp_reads_as_their_own_tokenizer_are_written_as_gguf(tiny_model, tmp_path):
    import shutil

    from worker.training.gguf_export import GgufUnsupported, check_supported, llama_cpp_pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    assert llama_cpp_pre_tokenizer(byte_level) == "gpt2"
    assert llama_cpp_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    assert llama_cpp_pre_tokenizer({"type": "Metaspace"}) is None
    assert check_supported(tiny_model) == "gpt2"
    other = shutil.copytree(tiny_model, tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps({**tokenizer, "pre_tokenizer": {"type": "Metaspace"}}))
    with pytest.raises(GgufUnsupported, match="llama.cpp would split text differently"):
        check_supported(other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(GgufUnsupported, match="this base is Qwen2ForCausalLM"):
        check_supported(other)
