"""fairseq models of the plugin; fairseq also imports every module here by itself (``--user-dir``)."""
