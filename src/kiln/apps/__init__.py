"""Applications and the content-domain proxy (``proxy.py``) they share with sessions'
editors and web UIs: one origin per label under the content domain, by Host name."""
