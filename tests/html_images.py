"""Reading a report back: the `src` of every <img>, for tests that check each picture exists."""

from html.parser import HTMLParser


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def image_sources(page: str) -> list[str]:
    parser = _Images()
    parser.feed(page)
    return parser.sources
