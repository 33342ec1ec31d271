"""The Streamlit viewer: launcher, pure helpers and the page."""
