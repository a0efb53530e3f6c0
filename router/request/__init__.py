"""One request's path through the router: validation, admission, queue order, placement, dispatch, re-dispatch, n choices."""
