"""The Python twin of `cargo run --release --example bench`: the same
Llama-shaped model with transformers + PEFT, printing the same figures.

Not run by CI. `pip install torch transformers peft`, then for example:

    python benches/pytorch_peft.py --hidden 512 --layers 4 --intermediate 1408 \
        --vocab 4096 --heads 8 --batch 4 --seq 128 --rank 16 --steps 5 --threads 2
"""
import argparse, os, resource, tempfile, time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
for name, default in [("hidden", 512), ("layers", 4), ("intermediate", 1408), ("vocab", 4096), ("heads", 8),
                      ("batch", 4), ("seq", 128), ("rank", 16), ("steps", 5), ("threads", 2)]:
    p.add_argument(f"--{name}", type=int, default=default)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads, rms_norm_eps=1e-6,
                  attn_implementation="eager")
tokens = a.batch * a.seq
ids = (torch.arange(tokens) * 7919 % a.vocab).reshape(a.batch, a.seq)


def timed(f):
    f()
    start = time.perf_counter()
    for _ in range(a.steps):
        f()
    return (time.perf_counter() - start) / a.steps


print(f"Llama-shaped: hidden {a.hidden}, layers {a.layers}, intermediate {a.intermediate}, vocab {a.vocab}, "
      f"heads {a.heads}; batch {a.batch} x {a.seq} tokens; r = {a.rank}; torch {torch.__version__}; {a.threads} threads")
model = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    base = timed(lambda: model(input_ids=ids))
print(f"forward, base:           {tokens / base:9.0f} tokens/s")
start = time.perf_counter()
model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules="all-linear"))
print(f"apply_lora:              {(time.perf_counter() - start) * 1e3:9.2f}ms")
with torch.no_grad():
    unmerged = timed(lambda: model(input_ids=ids))
print(f"forward, LoRA unmerged:  {tokens / unmerged:9.0f} tokens/s ({unmerged / base:.3f}x the base time)")
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def step():
    out = model(input_ids=ids[:, :-1], labels=None).logits
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()


train = timed(step)
print(f"training step:           {tokens / train:9.0f} tokens/s")
model.eval()
model.merge_adapter()
with torch.no_grad():
    merged = timed(lambda: model(input_ids=ids))
print(f"forward, LoRA merged:    {tokens / merged:9.0f} tokens/s ({merged / base:.3f}x the base time)")
model.unmerge_adapter()
with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    model.save_pretrained(d)
    print(f"save_adapter:            {(time.perf_counter() - start) * 1e3:9.2f}ms")
    fresh = LlamaForCausalLM(cfg)
    start = time.perf_counter()
    PeftModel.from_pretrained(fresh, d)
    print(f"load_adapter:            {(time.perf_counter() - start) * 1e3:9.2f}ms")
print(f"peak resident memory:    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:9.1f} MiB")
