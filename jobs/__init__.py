"""Ray jobs that use the running saeserve application through its handle (``serve.get_app_handle``)."""
