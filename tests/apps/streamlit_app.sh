# Streamlit as a Kiln application: on CML's port, on the sandbox's loopback.
exec python -m streamlit run streamlit_app.py \
  --server.address 127.0.0.1 --server.port "$CDSW_APP_PORT" \
  --server.headless true --browser.gatherUsageStats false
