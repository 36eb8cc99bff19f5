"""The Python twin of `cargo run --release --example bench`: the same
Llama-shaped model with transformers + PEFT, printing the same figures.

Not run by CI. `pip install torch transformers peft`, then for example:

    python benches/pytorch_peft.py --hidden 512 --layers 4 --intermediate 1408 \
        --vocab 4096 --heads 8 --batch 4 --seq 128 --rank 16 --steps 5 --threads 2 --tuned yes
"""
import argparse, ctypes, os, resource, tempfile, time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
for name, default in [("hidden", 512), ("layers", 4), ("intermediate", 1408), ("vocab", 4096), ("heads", 8),
                      ("batch", 4), ("seq", 128), ("rank", 16), ("steps", 5), ("threads", 2)]:
    p.add_argument(f"--{name}", type=int, default=default)
p.add_argument("--tuned", choices=["yes", "no"], default="yes",
               help="keep freed memory in glibc's malloc, as the Rust bench's --tuned yes does")
a = p.parse_args()
runtime = "defaults"
if a.tuned == "yes":
    # mallopt(M_MMAP_THRESHOLD = -3 / M_TRIM_THRESHOLD = -1, 1 GiB): the Rust bench's setting.
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 30) == 1:
        runtime = "glibc malloc keeps freed memory"
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads, rms_norm_eps=1e-6,
                  attn_implementation="eager")
tokens = a.batch * a.seq
ids = (torch.arange(tokens) * 7919 % a.vocab).reshape(a.batch, a.seq)


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024


def time_and_memory(f):
    """Time of f() and how far resident memory rose above where it started
    (writing 5 to /proc/self/clear_refs resets the peak, as the Rust bench does)."""
    with open("/proc/self/clear_refs", "w") as c:
        c.write("5")
    before = status_mib("VmRSS:")
    start = time.perf_counter()
    f()
    return time.perf_counter() - start, status_mib("VmHWM:") - before


def timed(f):
    f()
    start = time.perf_counter()
    for _ in range(a.steps):
        f()
    return (time.perf_counter() - start) / a.steps


print(f"Llama-shaped: hidden {a.hidden}, layers {a.layers}, intermediate {a.intermediate}, vocab {a.vocab}, "
      f"heads {a.heads}; batch {a.batch} x {a.seq} tokens; r = {a.rank}; torch {torch.__version__}; {a.threads} threads")
print(f"runtime: {runtime}")
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


phases = [0.0, 0.0, 0.0]


def step():
    t0 = time.perf_counter()
    out = model(input_ids=ids[:, :-1], labels=None).logits
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    t3 = time.perf_counter()
    for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
        phases[i] += d


train = timed(step)
f, b, u = (x * 1e3 / (a.steps + 1) for x in phases)
print(f"training step:           {tokens / train:9.0f} tokens/s (forward {f:.0f} ms, backward {b:.0f} ms, AdamW {u:.1f} ms)")
print(f"peak resident memory:    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:9.1f} MiB (through training)")
model.eval()
largest = a.hidden * max(a.intermediate, a.hidden) * 4 / 2**20
with torch.no_grad():
    merge_time, merge_rise = time_and_memory(model.merge_adapter)
print(f"merge:                   {merge_time * 1e3:9.2f}ms (resident memory {merge_rise:+.1f} MiB at most; "
      f"the largest adapted weight is {largest:.1f} MiB)")
with torch.no_grad():
    merged = timed(lambda: model(input_ids=ids))
print(f"forward, LoRA merged:    {tokens / merged:9.0f} tokens/s ({merged / base:.3f}x the base time)")
with torch.no_grad():
    unmerge_time, unmerge_rise = time_and_memory(model.unmerge_adapter)
print(f"unmerge:                 {unmerge_time * 1e3:9.2f}ms (resident memory {unmerge_rise:+.1f} MiB at most)")
merges, unmerges = [], []
with torch.no_grad():
    for _ in range(max(a.steps, 5)):
        merges.append(time_and_memory(model.merge_adapter)[0])
        unmerges.append(time_and_memory(model.unmerge_adapter)[0])
mid = lambda xs: sorted(xs)[len(xs) // 2] * 1e3
print(f"merge, unmerge (median): {mid(merges):9.2f}ms {mid(unmerges):.2f}ms ({len(merges)} pairs)")
with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    model.save_pretrained(d)
    print(f"save_adapter:            {(time.perf_counter() - start) * 1e3:9.2f}ms")
    fresh = LlamaForCausalLM(cfg)
    start = time.perf_counter()
    PeftModel.from_pretrained(fresh, d)
    print(f"load_adapter:            {(time.perf_counter() - start) * 1e3:9.2f}ms")
