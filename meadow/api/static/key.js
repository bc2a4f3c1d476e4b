// The API key, for an API started with `meadow api --api-key`: kept in this browser, asked for when the API answers
// 401. No dependencies.
"use strict";

const API_KEY_ITEM = "meadow.apiKey";
let keyDeclined = false;  // the user cancelled: ask no more until the page is reloaded

// fetch, with the key; on a 401, ask for the key and try again
async function apiFetch(url, options = {}) {
  for (;;) {
    const key = localStorage.getItem(API_KEY_ITEM);
    const headers = {...options.headers, ...(key ? {Authorization: `Bearer ${key}`} : {})};
    const response = await fetch(url, {...options, headers});
    if (response.status !== 401) return response;
    // refused with a key that another request has replaced since (prompt() blocks the page: one question at a time)
    if (localStorage.getItem(API_KEY_ITEM) !== key) continue;
    if (keyDeclined) return response;
    const entered = window.prompt(key ? "That API key was refused. The key:" : "This API needs a key:");
    if (!entered?.trim()) {
      keyDeclined = true;
      return response;
    }
    localStorage.setItem(API_KEY_ITEM, entered.trim());
  }
}
