"""transformers' side of examples/generate_bench.rs: the same checkpoint,
threads, dtype, prompt and number of new tokens, the same figures.

    cargo run --release --example generate_bench -- --write /tmp/llama512
    python benches/transformers_generate.py /tmp/llama512 --threads 2

Needs torch and transformers (5.24 for docs/PERFORMANCE.md); not run by CI.
"""

import argparse
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    before = peak_rss_mib()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - started
    loaded = peak_rss_mib()
    print(f"load: {load:.3f} s; peak RSS {loaded:.1f} MiB ({before:.1f} MiB before loading: python + torch)")

    # The prompt generate_bench.rs uses.
    prompt = torch.tensor([[(i * 7 + 3) % 100 + 1 for i in range(args.prompt_len)]])
    mask = torch.ones_like(prompt)

    def run(new_tokens):
        with torch.inference_mode():
            return model.generate(
                prompt,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )

    run(4)
    rates = []
    for _ in range(args.runs):
        started = time.perf_counter()
        out = run(args.new_tokens)
        rates.append((out.shape[1] - prompt.shape[1]) / (time.perf_counter() - started))
    print(f"peak RSS after generating: {peak_rss_mib():.1f} MiB")
    print(
        f"generate: prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, batch 1: "
        f"{statistics.median(rates):.1f} tokens/s median, {max(rates):.1f} best of {len(rates)}"
    )


if __name__ == "__main__":
    main()
