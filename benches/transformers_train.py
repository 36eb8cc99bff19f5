"""transformers + PEFT's side of `peft train`'s throughput: the same
checkpoint, data, batch, sequence length, adapter and threads, a plain
training loop (what `Trainer` runs, without its callbacks), the same
figures.

    cargo run --release --example generate_bench -- --write /tmp/llama512t --vocab 4096
    cp tests/fixtures/llama_with_tokenizer/tokenizer*.json /tmp/llama512t/
    python benches/transformers_train.py --write-data /tmp/train512.jsonl
    target/release/peft train --model /tmp/llama512t --train /tmp/train512.jsonl --steps 12 \
        --batch-size 4 --max-seq-len 128 --rank 16 --alpha 32 --json
    python benches/transformers_train.py /tmp/llama512t /tmp/train512.jsonl --steps 12 --threads 2

Each line of the data is long enough to be cut to 128 tokens, so every
batch is 4 x 128 with no padding on either side. Tokens/s counts predicted
tokens (127 an example), as `peft train` does. Needs torch, transformers
(5.24 for docs/PERFORMANCE.md), peft (0.21.2) and tokenizers; not run by CI.
"""

import argparse
import json
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

WORDS = "the robot read news and said hello to a neighbour who said hello back open doors let cold wind in".split()


def write_data(path, lines=64, words=160, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("data", nargs="?")
    parser.add_argument("--write-data", metavar="FILE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    args = parser.parse_args()
    if args.write_data:
        write_data(args.write_data)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [json.loads(line)["text"] for line in open(args.data) if line.strip()]
    examples = []
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert len(ids) >= args.max_seq_len, "make the lines longer"
        examples.append(ids[: args.max_seq_len])

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rates = []
    for step in range(args.steps):
        start = (step * args.batch_size) % len(examples)
        batch = torch.tensor([examples[(start + i) % len(examples)] for i in range(args.batch_size)])
        started = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        seconds = time.perf_counter() - started
        rates.append(args.batch_size * (args.max_seq_len - 1) / seconds)
        print(json.dumps({"step": step + 1, "loss": out.loss.item(), "tokens_per_second": rates[-1]}))
    measured = rates[2:] if len(rates) > 4 else rates
    print(f"transformers + PEFT: {statistics.median(measured):.0f} tokens/s median over steps 3..{args.steps}")


if __name__ == "__main__":
    main()
