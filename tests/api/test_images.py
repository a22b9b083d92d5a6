"""Images in chat over gRPC on the real model (the voice-and-image issue, item 3): the server reads
an image's text (OCR) and the model answers from it; bad images are INVALID_ARGUMENT with the field
named; the CLI sends images. (A stored chat keeping an image and its text across a restart is
checked in test_history.py's restart test, which restarts a server anyway.)"""

from __future__ import annotations

import grpc
import pytest
from images_drawn import text_image

from tokenwire.v1 import history_pb2 as hpb
from tokenwire.v1 import history_pb2_grpc as hpb_grpc
from tokenwire.v1 import inference_pb2 as pb

GREEDY = pb.SamplingParams(temperature=0)
INVOICE = ["Invoice number: 48213", "Amount due: 950 EUR"]
QUESTION = "What is the invoice number in the image? Answer with the number only."


def answer(stub, messages, **kw) -> tuple[str, pb.Finished]:
    events = list(stub.Generate(pb.GenerateRequest(messages=messages, sampling=GREEDY, max_tokens=24, **kw),
                                timeout=120))
    return "".join(e.token.text for e in events if e.WhichOneof("event") == "token"), events[-1].finished


def test_the_model_answers_from_the_text_in_an_image(stub) -> None:
    image = pb.Image(data=text_image(INVOICE), media_type="image/png")
    text, finished = answer(stub, [pb.ChatMessage(role="user", content=QUESTION, images=[image])])
    assert "48213" in text, text
    _, without = answer(stub, [pb.ChatMessage(role="user", content=QUESTION)])
    assert finished.usage.prompt_tokens > without.usage.prompt_tokens + 15, "the image's text is in the prompt"


def test_bad_images_are_refused_by_field(stub) -> None:
    cases = [
        (pb.Image(data=b"not an image at all"), "IMAGE_INVALID"),
        (pb.Image(data=b""), "IMAGE_INVALID"),
        (pb.Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "IMAGE_INVALID"),
    ]
    for image, _reason in cases:
        with pytest.raises(grpc.RpcError) as exc:
            answer(stub, [pb.ChatMessage(role="user", content="What does it say?", images=[image])])
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith("messages[0].images[0] is "), exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        answer(stub, [pb.ChatMessage(role="system", content="x", images=[pb.Image(data=text_image(["x"]))]),
                      pb.ChatMessage(role="user", content="hi")])
    assert exc.value.details() == "messages[0]: only user messages hold images"


def test_the_cli_sends_images(server, tmp_path) -> None:
    import io
    import subprocess

    from conftest import cli

    from tokenwire.clients.commands.chat_repl import ChatOptions, ChatRepl

    png = tmp_path / "invoice.png"
    png.write_bytes(text_image(INVOICE))
    done = subprocess.run(cli("generate", "--server", server.target, "--image", str(png), "-n", "24", "-t", "0",
                              QUESTION), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "48213" in done.stdout, done.stderr
    missing = subprocess.run(cli("generate", "--server", server.target, "--image", str(tmp_path / "nope.png"), "x"),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--image" in missing.stderr and "No such file" in missing.stderr

    out = io.StringIO()
    channel = grpc.insecure_channel(server.target)
    repl = ChatRepl(channel, ChatOptions(max_tokens=24, sampling=GREEDY), out)
    repl.command(f"/image {png}")
    assert "attached invoice.png" in out.getvalue()
    repl.turn(QUESTION)
    assert "48213" in out.getvalue().split("attached invoice.png", 1)[1]
    stored = hpb_grpc.HistoryStub(channel).GetChat(hpb.GetChatRequest(chat_id=repl.chat.id), timeout=30)
    assert len(stored.messages[0].images) == 1 and not repl.images, "the image went with that message only"
    channel.close()
