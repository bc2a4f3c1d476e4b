// The conversations the chat page keeps in this browser's local storage: a list, newest first, of {id, messages,
// updated}, the messages as OpenAI's (an answer's also with `info`, its meta line). No dependencies.
"use strict";

const CONVERSATIONS = "meadow.conversations";
const KEPT = 50;  // the oldest beyond these are forgotten

const isMessage = (m) => ["user", "assistant"].includes(m?.role) && typeof m.content === "string";
const isConversation = (c) => typeof c?.id === "string" && Array.isArray(c.messages) && c.messages.every(isMessage);
const titleOf = (conversation) => conversation.messages.find((m) => m.role === "user")?.content ?? "";
const newConversationId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 10);

// The saved conversations; anything else saved under their name is dropped.
function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(CONVERSATIONS) ?? "[]");
    return Array.isArray(list) ? list.filter(isConversation) : [];
  } catch (error) {
    return [];
  }
}

// Store `list`; when the browser's storage is full, without its oldest conversations, as many as it takes (all of
// them, at worst). Returns what was stored.
function storeConversations(list) {
  for (list = list.slice(0, KEPT); ; list = list.slice(0, -1)) {
    try {
      localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
      return list;
    } catch (full) {
      if (!list.length) {
        localStorage.removeItem(CONVERSATIONS);
        return list;
      }
    }
  }
}

// `list` with conversation `id` holding `messages`, now the newest (or gone, when it holds none); stored.
function keepConversation(list, id, messages) {
  const others = list.filter((c) => c.id !== id);
  return storeConversations(messages.length ? [{id, messages, updated: Date.now()}, ...others] : others);
}
