"""studio.ui.common.bind: a module-level handler bound to its studio keeps what Gradio reads from a function
(functools.partial hides the gr.Request annotation, so Gradio would pass no request and every caller would be
the owner; a generator must stay a generator for streamed outputs)."""
import functools
import inspect

import gradio as gr
from gradio.helpers import special_args

from rlhf_studio.studio.ui.common import bind


def handler(studio, slot: int, value, request: gr.Request = None):
    return studio, slot, value, getattr(request, "username", None)


def streamed(studio, value, request: gr.Request = None):
    yield from (studio, value)


def test_bind_keeps_the_request_parameter_and_generators():
    bound = bind(handler, "s", 2)
    assert list(inspect.signature(bound).parameters) == ["value", "request"] and bound.__name__ == "handler"
    req = gr.Request(username="bo")
    args, *_ = special_args(bound, ["v"], request=req)
    assert bound(*args) == ("s", 2, "v", "bo")
    partial = functools.partial(handler, "s", 2)
    hidden, *_ = special_args(partial, ["v"], request=req)
    assert partial(*hidden)[3] is None      # what partial would have done: the caller lost, taken for the owner
    assert inspect.isgeneratorfunction(bind(streamed, "s")) and list(bind(streamed, "s")(1)) == ["s", 1]
