"""Token ids -> text for one sequence, step by step, with stop strings that never reach the caller.

Byte-level BPE splits multi-byte characters across tokens; a decode that ends inside one yields U+FFFD, so
the tail of replacement characters is held back until the next token completes it (or the sequence ends).
While a sequence runs, the last ``stop_holdback`` characters are held back too: they may be the start of a
stop string. The text is re-decoded from all output ids each step (linear per step; simple and exact).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from engine.sampling import SamplingParams, find_stop

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """The text of one sequence's output ids; ``update`` after every appended token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._stops = params.stop
        self._holdback = params.stop_holdback if params.stop else 0
        self._text = ""
        self._stopped = False

    def update(self, output_token_ids: Sequence[int]) -> str | None:
        """Decode the outputs so far; returns the stop string that matched in the new text, if one did.

        After a match the text is cut where the stop string starts and stays fixed.
        """
        if self._stopped:
            return None
        text = self._tokenizer.decode(output_token_ids, skip_special_tokens=True)
        stable = text.rstrip(REPLACEMENT_CHAR)
        num_new = max(len(stable) - len(self._text.rstrip(REPLACEMENT_CHAR)), 0)
        self._text = text
        if self._stops:
            hit = find_stop(stable, self._stops, num_new)
            if hit is not None:
                index, stop = hit
                self._text = stable[:index]
                self._stopped = True
                return stop
        return None

    def text(self, finished: bool) -> str:
        """The text the caller may see: everything once finished, else without the held-back tail."""
        if finished or self._stopped:
            return self._text
        stable = self._text.rstrip(REPLACEMENT_CHAR)
        return stable[: max(len(stable) - self._holdback, 0)]
