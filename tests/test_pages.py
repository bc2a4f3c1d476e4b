"""The web pages `meadow api` serves, driven in headless Chromium (Debian's `chromium`, through playwright) against a
real loopback swarm: the chat page streams the model's answer, the monitor shows every server's blocks.

MEADOW_SCREENSHOTS=1 also saves docs/monitor.png (docs/chat.png shows the default model, on `meadow demo --keep`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from meadow.client.chat_prompt import chat_prompt_ids, stop_strings
from meadow.client.sequence import connect_sequence
from meadow.local_swarm import LocalSwarm, Process
from meadow.models import load_config, load_reference_model, load_tokenizer
from tests.test_api import THINKING_TEMPLATE, api_with_template, http, wait_until

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCREENSHOTS = os.environ.get("MEADOW_SCREENSHOTS") == "1"


def chromium_path() -> str:
    path = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
    if path is None:
        message = "the page tests need Debian's chromium: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need playwright: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(checkpoints):
    """An API over a swarm that serves the model on blocks 0:2 and 2:4, and the same checkpoint under another swarm
    name on blocks 0:2 only (so that the monitor has a gap to show)."""
    path = checkpoints("llama", num_layers=4)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        swarm.start_server(path, "--blocks", "0:2", "--public-name", "hill-farm", wait=False)
        swarm.start_server(path, "--blocks", "2:4", "--public-name", "river-bank", wait=False)
        swarm.start_server(path, "--blocks", "0:2", "--dht-prefix", "half-served", wait=False)
        # sessions closed with their requests: the last test has other peers take every cache slot
        api = Process(["api", str(path), "--initial-peers", *swarm.initial_peers, "--port", "0",
                       "--keep-sessions", "0"], "api")  # fmt: skip
        swarm.extra.append(api)  # stopped with the swarm, all at once
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        url = api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2] + "/"
        yield {"path": path, "swarm": swarm, "url": url}


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    yield page
    page.close()


def local_answer(path, conversation: str | list[dict], max_tokens: int) -> str:
    """The local transformers model's greedy reply to a question or a conversation, cut where the API cuts it."""
    tokenizer = load_tokenizer(path)
    local = load_reference_model(path)
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    with torch.no_grad():
        out = local.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_tokens, do_sample=False)
    text = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    return text[: min([text.find(stop) for stop in stop_strings(tokenizer) if stop in text], default=len(text))]


def type_question(page, url: str | None, question: str, max_tokens: int) -> None:
    """Open the chat page (or stay on it: url None) and, keyboard only, set the temperature to 0 (greedy), a token
    budget, and the question."""
    if url is not None:
        page.goto(url)
    page.focus("#temperature")
    page.keyboard.press("Home")
    page.fill("#max-tokens", str(max_tokens))
    page.focus("#prompt")
    page.keyboard.type(question)


def test_chat_page_streams_the_greedy_answer_and_keeps_the_conversation_over_a_reload(page, served):
    question = "What grows in a meadow?"
    type_question(page, served["url"], question, 24)
    # record every text the answer shows while it streams
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bubble = document.querySelector('.turn.assistant .bubble');
            if (bubble && bubble.textContent) window.seen.push(bubble.textContent);
        }).observe(document.getElementById('thread'), {subtree: true, childList: true, characterData: true});
    }""")
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)

    answer = page.text_content(".turn.assistant .bubble")
    assert answer == local_answer(served["path"], question, 24)
    assert page.is_hidden(".turn.assistant .reasoning")  # a model that does not reason: no thinking shown
    assert len(set(page.evaluate("window.seen"))) > 1  # it appeared piece by piece
    assert page.text_content(".turn.user .bubble") == question
    hops = page.locator(".turn.assistant .meta .hop").all_text_contents()
    assert [hop.split()[1] for hop in hops] == ["0:2", "2:4"]
    assert " s" in page.text_content(".turn.assistant .meta")  # how long it took

    page.reload()  # the conversation is still there, meta line included, and goes on from where it was
    assert page.text_content(".turn.user .bubble") == question
    assert page.text_content(".turn.assistant .bubble") == answer
    assert page.locator(".turn.assistant[data-done] .meta .hop").all_text_contents() == hops
    follow_up = "And what lives there?"
    type_question(page, None, follow_up, 24)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done] >> nth=1", timeout=60_000)
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    expected = local_answer(served["path"], [*conversation, {"role": "user", "content": follow_up}], 24)
    assert page.locator(".turn.assistant .bubble").nth(1).text_content() == expected


def test_chat_page_of_an_api_over_two_models_answers_with_the_one_chosen(page, served, checkpoints):
    other = checkpoints("qwen2", num_layers=2)
    with LocalSwarm() as swarm:  # a swarm of its own: the served one's stays as the monitor's test expects it
        swarm.start_dht()
        swarm.start_server(served["path"], "--blocks", "0:4", wait=False)
        swarm.start_server(other, "--blocks", "0:2", wait=False)
        api = Process(["api", str(served["path"]), str(other), "--initial-peers", *swarm.initial_peers, "--port",
                       "0"], "api")  # fmt: skip
        swarm.extra.append(api)
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        url = api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2] + "/"
        chosen_model_answers(page, url, other)


def chosen_model_answers(page, url: str, other) -> None:
    """The chat page at `url` offers two models; the second one chosen (`other`) answers, and stays chosen."""
    page.goto(url)
    page.wait_for_selector("#model-choice option >> nth=1", state="attached")
    choices = page.locator("#model-choice option").all_text_contents()
    assert len(choices) == 2 and page.is_hidden("#model") and page.input_value("#model-choice") == choices[0]
    page.select_option("#model-choice", choices[1])
    type_question(page, None, "What grows in a meadow?", 12)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    assert page.text_content(".turn.assistant .bubble") == local_answer(other, "What grows in a meadow?", 12)
    assert page.text_content(".turn.assistant .meta span") == choices[1]  # the answer names its model
    page.reload()  # the choice is kept
    page.wait_for_selector("#model-choice option >> nth=1", state="attached")
    assert page.input_value("#model-choice") == choices[1]
    assert page.text_content(".turn.assistant[data-done] .meta span") == choices[1]
    page.select_option("#model-choice", choices[0])
    page.click("#new-chat")
    page.click("#conversations li .open")  # the conversation goes on with the model that answered it
    assert page.input_value("#model-choice") == choices[1]


def test_chat_page_shows_a_reasoning_models_thinking_folded_above_its_answer(page, served, tmp_path):
    """An API over a copy of the model whose template opens the reply's think block: the greedy reply (all thinking in
    8 tokens) shows open under "Thought" while it comes, the answer empty; after a reload, folded, still there."""
    url, tokenizer = api_with_template(served, tmp_path, THINKING_TEMPLATE)
    question = "Why is the sky blue?"
    type_question(page, url, question, 8)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    expected = local_answer(tmp_path / "tiny-llama", question, 8).strip()
    assert expected and page.text_content(".turn.assistant .reasoning .thinking") == expected
    assert page.is_visible(".turn.assistant .reasoning .thinking")  # open: no answer came after it
    assert page.text_content(".turn.assistant .bubble") == ""
    page.reload()
    assert page.text_content(".turn.assistant .reasoning .thinking") == expected
    assert page.is_visible(".turn.assistant .reasoning summary") and page.is_hidden(".turn.assistant .thinking")


def test_chat_page_stops_an_answer_and_starts_a_new_chat(page, served):
    # greedy: a sampled answer of the random tiny model may end after a character or two, before Escape
    type_question(page, served["url"], "Say a lot", 3000)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.turn.assistant .bubble')?.textContent.length > 3", timeout=60_000)
    page.keyboard.press("Escape")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=30_000)
    assert "stopped" in page.text_content(".turn.assistant .meta")
    assert page.is_visible("#send") and not page.is_visible("#stop")

    page.click("#new-chat")
    assert page.locator(".turn").count() == 0
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.reload()  # a new chat still, the one left kept in the list
    assert page.locator(".turn").count() == 0 and page.is_visible("#welcome")
    assert page.locator("#conversations li").all_text_contents() == ["Say a lot×"]
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    for garbage in ['{"id": "a", "messages": []}', '[{"id": "a", "messages": [{"role": "user", "content": 1}]}]', "[1"]:
        page.evaluate("(text) => localStorage.setItem('meadow.conversations', text)", garbage)
        page.reload()  # saved by something else: dropped, not half shown
        assert page.locator(".turn, #conversations li").count() == 0 and page.is_visible("#welcome") and not errors
    # the browser's storage is full: the answer comes all the same, and the page is ready for the next question
    page.evaluate("""() => {
        for (const size of [1 << 20, 1 << 14, 1 << 8, 1]) {
            try {
                for (let i = 0; ; i++) localStorage.setItem(`filler ${size} ${i}`, "x".repeat(size));
            } catch (full) {}
        }
    }""")
    type_question(page, None, "Hello", 4)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    assert page.is_visible("#send") and not page.is_visible("#stop") and not errors


def test_chat_page_follows_a_system_prompt_copies_an_answer_asks_again_and_edits(browser, served):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto(served["url"])
    page.click("#system-details summary")
    instructions = "You answer like a gardener."
    page.fill("#system", instructions)
    question = "What grows in a meadow?"
    type_question(page, None, question, 16)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    conversation = [{"role": "system", "content": instructions}, {"role": "user", "content": question}]
    answer = page.text_content(".turn.assistant .bubble")
    assert answer == local_answer(served["path"], conversation, 16)

    page.click(".turn.assistant .meta .copy")
    assert page.evaluate("navigator.clipboard.readText()") == answer
    # asked again with a smaller budget: one answer, to the same conversation, kept over a reload
    page.fill("#max-tokens", "6")
    page.click(".turn.assistant .meta .regenerate")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    assert page.locator(".turn.assistant").count() == 1 and page.locator(".turn.user").count() == 1
    again = page.text_content(".turn.assistant .bubble")
    assert again == local_answer(served["path"], conversation, 6) != answer
    page.reload()
    assert page.input_value("#system") == instructions and page.is_visible("#system")
    assert page.locator(".turn.assistant .bubble").all_text_contents() == [again]

    # the question edited: it goes back to the message box, its answer away; the edited one is answered instead
    page.click(".turn.assistant .meta .edit")
    assert page.input_value("#prompt") == question and page.locator(".turn").count() == 0
    edited = "What grows in a wet meadow?"
    page.fill("#prompt", edited)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    assert page.locator(".turn.user .bubble").all_text_contents() == [edited]
    conversation[-1]["content"] = edited
    assert page.text_content(".turn.assistant .bubble") == local_answer(served["path"], conversation, 6)
    page.reload()
    assert page.locator(".turn.user .bubble").all_text_contents() == [edited]

    # a question the API refuses goes back to the composer, to be asked again; the conversation is as it was
    page.fill("#max-tokens", "0")
    page.focus("#prompt")
    page.keyboard.type("And now?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.error", timeout=30_000)
    assert "max_tokens" in page.text_content(".turn.error")
    assert page.input_value("#prompt") == "And now?"
    assert page.locator(".turn.user .bubble").all_text_contents() == [edited]
    assert len(page.evaluate("JSON.parse(localStorage.getItem('meadow.conversations'))[0].messages")) == 2
    assert not page.is_visible(".regenerate") and not page.is_visible(".edit")  # the last turn is the error
    context.close()


def test_chat_page_shows_code_blocks_as_code_and_no_answer_as_html(browser, served):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(served["url"])
    code = "for flower in meadow:\n    print('<b>', flower)"
    inline = "Use `add`, **not** `<b>`."
    markdown = ("## Steps **now**\n- pick [a flower](https://example.org/a?b=1)\n  * [trap](javascript:history.back)\n"
                "3 * 4 is not a list")  # fmt: skip
    answer = (f"Here:\n```python\n{code}\n```\nDone <img src=x onerror=alert(1)>\n{inline}\n{markdown}\n"
              "```\nnot closed")  # fmt: skip
    saved = [{"role": "user", "content": "Show me"}, {"role": "assistant", "content": answer, "info": {"seconds": 1}}]
    page.evaluate("(saved) => localStorage.setItem('meadow.conversations', JSON.stringify(saved))",
                  [{"id": "kept", "messages": saved, "updated": 0}])
    page.reload()
    page.click("#conversations li .open")
    blocks = page.locator(".turn.assistant .bubble pre.code-block")
    assert blocks.locator("code").all_text_contents() == [code, "not closed"]
    assert blocks.first.get_attribute("data-language") == "python"
    assert page.locator(".turn.assistant .bubble img, .turn.assistant .bubble b").count() == 0
    assert "Done <img src=x onerror=alert(1)>" in page.text_content(".turn.assistant .bubble")
    # inline code and bold shown so, their marks kept in the answer's text but not shown
    assert page.locator(".bubble code.inline").all_inner_texts() == ["add", "<b>"]
    assert page.locator(".bubble strong.inline").all_inner_texts() == ["not", "now"]
    bubble = page.locator(".turn.assistant .bubble")
    assert inline in bubble.text_content() and inline not in bubble.inner_text()
    # headings, bullets and links too; a link only to an http(s) address, opened apart from the page
    assert markdown in bubble.text_content()
    assert page.locator(".bubble .heading.h2").all_inner_texts() == ["Steps now"]
    assert page.locator(".bubble .bullet").count() == 2
    (link,) = page.locator(".bubble a").all()
    assert link.inner_text() == "a flower" and link.get_attribute("href") == "https://example.org/a?b=1"
    assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
    blocks.first.locator(".copy-code").click()
    assert page.evaluate("navigator.clipboard.readText()") == code
    page.click(".turn.assistant .meta .copy")
    assert page.evaluate("navigator.clipboard.readText()") == answer
    assert not errors
    context.close()


def test_chat_page_keeps_conversations_apart_in_its_list(page, served):
    path = served["path"]
    first, second = "What grows in a meadow?", "Name a river."
    type_question(page, served["url"], first, 8)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    first_answer = page.text_content(".turn.assistant .bubble")
    page.click("#new-chat")
    type_question(page, None, second, 8)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    assert page.locator("#conversations li .open").all_text_contents() == [second, first]  # newest first
    assert page.text_content("#conversations li.active .open") == second

    # back to the first: its turns on the page, and a follow-up continues that conversation, not the other
    page.click(f"#conversations li:has-text('{first}') .open")
    assert page.locator(".turn .bubble").all_text_contents() == [first, first_answer]
    type_question(page, None, "And what lives there?", 8)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done] >> nth=1", timeout=60_000)
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": first_answer},
                    {"role": "user", "content": "And what lives there?"}]  # fmt: skip
    assert page.locator(".turn.assistant .bubble").nth(1).text_content() == local_answer(path, conversation, 8)
    assert page.locator("#conversations li .open").all_text_contents() == [first, second]

    page.reload()  # the conversation it showed, the list as it was
    assert page.locator(".turn.user .bubble").all_text_contents() == [first, "And what lives there?"]
    assert page.text_content("#conversations li.active .open") == first
    page.click("#conversations li.active .delete")  # deleting the one on the page leaves a new chat
    assert page.locator(".turn").count() == 0
    assert page.locator("#conversations li .open").all_text_contents() == [second]
    page.reload()
    assert page.locator(".turn").count() == 0
    assert page.locator("#conversations li .open").all_text_contents() == [second]


def test_chat_page_asks_for_the_key_of_an_api_that_needs_one(page, served):
    """An API started with --api-key: the page asks for the key once (every request refused meanwhile waits for that
    one answer), keeps it, and answers; a page whose user declines says that it needs the key."""
    # it lives as long as the swarm: a session kept by it would hold cache that the last test has other peers fill
    api = Process(["api", str(served["path"]), "--initial-peers", *served["swarm"].initial_peers, "--port", "0",
                   "--api-key", "meadow-secret", "--keep-sessions", "0"], "api")  # fmt: skip
    served["swarm"].extra.append(api)
    url = api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2] + "/"
    asked = []
    page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("meadow-secret")))
    question = "What grows in a meadow?"
    type_question(page, url, question, 24)
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-llama'", timeout=30_000)
    page.keyboard.press("Enter")
    page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
    assert page.text_content(".turn.assistant .bubble") == local_answer(served["path"], question, 24)
    assert asked == ["This API needs a key:"]
    page.reload()  # the key is kept
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-llama'", timeout=30_000)
    assert len(asked) == 1

    declining = page.context.browser.new_page()
    declining.on("dialog", lambda dialog: dialog.dismiss())
    declining.goto(url)
    refused = "document.getElementById('model').textContent.includes('API key needed')"
    declining.wait_for_function(refused, timeout=30_000)
    declining.close()

    # a page from another origin on this machine (the first API's) may call it from the browser, key and all
    other = page.context.browser.new_page()
    other.goto(served["url"])
    fetched = other.evaluate("""async (url) => {
        const reply = await fetch(url + "v1/models", {headers: {Authorization: "Bearer meadow-secret"}});
        return (await reply.json()).data[0].id;
    }""", url)  # fmt: skip
    assert fetched == "tiny-llama" and urlsplit(served["url"]).netloc != urlsplit(url).netloc
    other.close()


def test_monitor_shows_every_servers_blocks(page, served):
    page.goto(served["url"] + "monitor")
    page.wait_for_selector("body[data-loaded]", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('tbody tr').length === 3", timeout=30_000)
    cards = page.locator(".model-card").all_text_contents()
    assert any("tiny-llama" in card and "all 4 blocks online" in card for card in cards)
    assert any("half-served" in card and "2 of 4 blocks online" in card for card in cards)
    assert page.locator(".coverage .block.online").count() == 6 and page.locator(".coverage .block.missing").count() == 2

    def table() -> dict[str, list[str]]:
        rows = page.locator("tbody tr").evaluate_all("rows => rows.map(r => r.innerText)")
        return {cells[0].strip(): [cell.strip() for cell in cells] for cells in (row.split("\t") for row in rows)}

    def cache_left() -> dict[str, str]:  # as the servers last announced it (less what sessions held then)
        _, view = http(served["url"] + "api/swarm")
        servers = [server for model in view["models"] for server in model["servers"]]
        assert all(0 < server["cache_tokens_left"] <= 16_384 for server in servers)
        return {"…" + server["peer"][-6:]: f"{server['cache_tokens_left']:,} tokens" for server in servers}

    peers = [next(line for line in s.lines if "ready" in line).split(" as ")[1].split(",")[0] for s in served["swarm"].servers]
    by_peer = table()
    for peer, blocks, name in zip(peers, ["0:2", "2:4", "0:2"], ["hill-farm", "river-bank", "—"]):
        row = by_peer["…" + peer[-6:]]
        assert row[1] == blocks and row[2] == "online" and row[-1] == name and row[3].endswith(" tokens/s")
    # the page shows each server's cache left (an announcement may land meanwhile: the page follows within 3 s)
    wait_until(lambda: {peer: row[4] for peer, row in table().items()} == cache_left(), timeout=15)
    if SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=DOCS / "monitor.png")


def test_chat_page_says_when_it_waits_for_room_on_full_servers(page, served):
    """Two other peers hold all 16384 cache slots of both servers: the page says it waits, then answers once they
    are gone, with the notice gone too. Last in the module: the servers announce the cache they had left meanwhile
    (the monitor shows it) until their next announcement."""
    path, peers = served["path"], served["swarm"].initial_peers
    config = load_config(path)
    holders = [connect_sequence(str(path), config, peers) for _ in range(2)]
    try:
        # one peer may hold 3/4 of a server's slots: 3 x 4096 here, the other 4096
        sessions = [holder.inference_session(4096, batch) for holder, batch in zip(holders, (3, 1))]
        for session, batch in zip(sessions, (3, 1)):
            session.step(torch.randn(batch, 2, config.hidden_size), torch.arange(2).expand(batch, 2), None)
        question = "Is there room?"
        type_question(page, served["url"], question, 8)
        page.keyboard.press("Enter")
        page.wait_for_selector(".turn.assistant .waiting", timeout=30_000)
        assert "waiting for room" in page.text_content(".turn.assistant .waiting")
        assert "not enough KV cache" in page.get_attribute(".turn.assistant .waiting", "title")
        for session in sessions:
            session.close()
        page.wait_for_selector(".turn.assistant[data-done]", timeout=60_000)
        assert page.locator(".waiting").count() == 0
        assert page.text_content(".turn.assistant .bubble") == local_answer(path, question, 8)
    finally:
        for holder in holders:
            holder.close()
