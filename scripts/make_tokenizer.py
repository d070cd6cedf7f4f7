"""Build the tiny Llama-3-style tokenizer fixture in tests/fixtures/tokenizer/.

Tests and the local default may not download anything, yet the teacher stage must derive its
prefix/suffix ids from a real chat template. This script trains a small byte-level BPE (so any text
tokenizes) on the English text below, adds Llama 3's special tokens in Llama 3's order after the
ordinary vocabulary, uses Llama 3's pre-tokenizer regex, and attaches Llama 3 Instruct's real chat
template. The output is deterministic: re-running it rewrites identical files.

    .venv/bin/python scripts/make_tokenizer.py [--out tests/fixtures/tokenizer]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizer"

# Size of the learned vocabulary (256 byte symbols + merges); special tokens come after it.
BPE_VOCAB_SIZE = 1024

# Llama 3's pre-tokenizer split pattern (from Meta-Llama-3-8B-Instruct's tokenizer.json).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3 8B Instruct's special tokens, in its order (ids 128000.. there, vocab end here).
NUM_RESERVED = 12
_RESERVED = [f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED)]
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    *_RESERVED[0:4],
    "<|start_header_id|>",
    "<|end_header_id|>",
    _RESERVED[4],
    "<|eot_id|>",
    *_RESERVED[5:],
]
BOS = "<|begin_of_text|>"
EOS = "<|eot_id|>"  # Llama 3 Instruct ends a turn (and generation) with <|eot_id|>
# Llama 3 has no pad token; a reserved one keeps padding distinct from every meaningful id.
PAD = "<|reserved_special_token_0|>"

# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The user asked the assistant a question, and the assistant gave a short and helpful answer.
The system prompt tells the assistant to be helpful, honest and harmless.

A voice assistant listens to speech, understands what the user wants, and responds in plain language.
People speak to their phones, their cars and their kitchens, and they expect to be understood.

What is the weather like today? It is sunny in the morning, with clouds and light rain in the afternoon.
Will it be warmer tomorrow? The forecast says the temperature will rise by about five degrees.

Please set a timer for ten minutes. Remind me to call my mother at seven o'clock this evening.
Play some quiet music while I read. Turn off the lights in the living room and lock the front door.

How do I make a cup of tea? Boil fresh water, pour it over the tea leaves, and wait three or four minutes.
Add milk or lemon if you like, and a little honey if you want it sweet.

The train to the city leaves from platform two at half past eight. Tickets can be bought at the station.
She travelled across the country by bus, stopping in small towns along the river.

Can you translate this sentence into French? Where is the nearest hospital? Who wrote this book?
Why is the sky blue? Sunlight is scattered by the air, and blue light is scattered more than red light.

The children played in the garden until it was dark, then came inside for dinner and a story.
My brother works as a teacher in a school near the old market, and he walks there every day.

Scientists measure the distance to the stars with light. The moon moves around the earth once a month.
Water freezes at zero degrees and boils at one hundred degrees at the level of the sea.

It's a beautiful day, isn't it? I've never seen so many birds. We'll go for a walk after lunch.
They're coming to visit next week, and we'd like to cook something special for them.

The committee met on Tuesday to discuss the budget for the coming year.
Several members said that the plan was too expensive, while others thought it was the only option.

Reading aloud helps young readers learn new words and understand how sentences are built.
Every recording in the dataset was read by a volunteer from somewhere in the world.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A journey of a thousand miles begins with a single step.

Numbers such as 1, 2, 3, 10, 42, 100, 2024 and 3.14 appear in many questions about time and money.
The meeting starts at 9:30 and ends at 11:00; the report is due on the 15th of March.

Good morning! Thank you very much. You're welcome. See you later. Have a nice weekend.
Excuse me, could you tell me the way to the library? Go straight ahead and turn left at the bank.

In the beginning the model knows nothing about sound, but it learns to listen by comparing itself
with the language model that reads the transcript. The student and the teacher should agree.

Speech carries more than words: tone, pace and accent tell us how a speaker feels and where they are from.
An assistant that hears the voice directly can answer questions and notice emotion at the same time.

The history of the city goes back more than two thousand years, to a small village by the sea.
Its people were farmers and fishermen, and later traders who sailed to distant ports.

If you could live anywhere in the world, where would you choose to live, and why?
What should I cook for dinner tonight? Something with vegetables, rice and a little spice would be nice.

system

You are a helpful assistant. Give answers as a simple single sentence.

user

What is the capital of France?

assistant

The capital of France is Paris.

user

Respond whether the input is sarcastic. Answer with a simple yes or no.

assistant

No.

user

Translate the input from English to German.

assistant

Sure, please give me the sentence you would like me to translate.

system

Respond in a single word what emotion the input exhibits.
"""


def build(out: Path) -> PreTrainedTokenizerFast:
    """Train the BPE, wrap it for transformers, save it to `out` and return it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    # Special tokens go after the learned vocabulary, as in Llama 3 (128000 onwards).
    tok.add_special_tokens(SPECIAL_TOKENS)
    # Like Llama 3, encoding with add_special_tokens=True prepends <|begin_of_text|>.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            ),
        ]
    )

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="directory to write (default: %(default)s)"
    )
    args = parser.parse_args()
    hf = build(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out}: {len(hf)} tokens ({len(SPECIAL_TOKENS)} special), {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
