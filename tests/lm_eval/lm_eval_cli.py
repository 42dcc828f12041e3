"""lm-eval-harness's own command line (`lm_eval ...`), with one bug of lm_eval 0.4.13 fixed.

With the remote tokenizer (vLLM's /tokenize and /tokenizer_info, which local-completions
auto-detects) and --apply_chat_template, `TemplateAPI.apply_chat_template` returns the
chat's message list unrendered; lm-eval then posts that list to /tokenize as the prompt
(a 400) instead of a string. The fix renders it with lm-eval's own
`RemoteTokenizer.apply_chat_template`, i.e. the chat template from the server's
/tokenizer_info, which is what the hugging-face backend does with a local tokenizer. Every
other path (requests, scoring, metrics, logging) is lm-eval's, unchanged.
"""

import sys

from lm_eval.models.api_models import TemplateAPI

_upstream = TemplateAPI.apply_chat_template


def _apply_chat_template(self, chat_history, add_generation_prompt=True):
    if self.tokenizer_backend == "remote" and self.tokenized_requests:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
    return _upstream(self, chat_history, add_generation_prompt=add_generation_prompt)


TemplateAPI.apply_chat_template = _apply_chat_template

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
