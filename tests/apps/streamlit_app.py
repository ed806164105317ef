"""A Streamlit app: the page is built over its WebSocket (``/_stcore/stream``), so seeing the
greeting in a browser proves the WebSocket crosses Kiln's proxy. The greeting names the user
from ``Remote-User``."""

import streamlit as st

user = st.context.headers.get("Remote-User") or "anonymous"
st.title("Streamlit on Kiln")
st.write(f"Hello, {user}!")
if st.button("Count"):
    st.session_state["count"] = st.session_state.get("count", 0) + 1
st.write(f"Clicks: {st.session_state.get('count', 0)}")
