// Export folders in the browser, as clients/node/lib/sidecar.js reads folders: one served at a
// URL (fetch), or one the user picked from disk (<input type="file" webkitdirectory>). Each
// listed file is read whole (onnxruntime-web takes the graph and its external data as bytes),
// hashed with Web Crypto and scanned in memory.

import { ExportFolderError } from "../node/lib/errors.js";
import { ArrayBytes, scanGraph } from "../node/lib/graph-scan.js";
import { SIDECAR_NAME } from "../node/lib/sidecar.js";

/** A file handle from bytes: {name, size, bytes, sha256(), scan(), text()}. */
function handle(name, bytes) {
  return {
    name,
    size: bytes.length,
    bytes,
    sha256: async () => hex(await crypto.subtle.digest("SHA-256", bytes)),
    scan: async () => scanGraph(new ArrayBytes(bytes), bytes.length),
    text: async () => new TextDecoder().decode(bytes),
  };
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** What both folders share: the sidecar and each listed file read once, by `read(relative, missing)`. */
class BytesFolder {
  cache = new Map();

  async sidecarText() {
    const missing = `${this.name} has no ${SIDECAR_NAME}; is it an export folder written by \`gptneo-onnx export\`?`;
    return new TextDecoder().decode(await this.read(SIDECAR_NAME, missing));
  }

  async file(relative, namedBy) {
    if (!this.cache.has(relative)) {
      const missing = `${this.name} is missing ${relative}, which ${namedBy} names; re-copy the export`;
      this.cache.set(relative, handle(relative, await this.read(relative, missing)));
    }
    return this.cache.get(relative);
  }
}

/** An export folder served over HTTP at `url` (a folder URL; a trailing slash is added). */
export class UrlFolder extends BytesFolder {
  constructor(url) {
    super();
    this.base = new URL(url.endsWith("/") ? url : `${url}/`, location.href);
    this.name = this.base.href.replace(/\/$/, "");
  }

  async read(relative, missing) {
    let response;
    try {
      response = await fetch(new URL(relative, this.base));
    } catch (error) {
      throw new ExportFolderError(`could not fetch ${relative} from ${this.name}: ${error.message}`);
    }
    if (response.status === 404) throw new ExportFolderError(missing);
    if (!response.ok) throw new ExportFolderError(`fetching ${relative} from ${this.name} gave HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  }
}

/** An export folder picked from disk: the FileList of a webkitdirectory input (files at its top level). */
export class PickedFolder extends BytesFolder {
  constructor(fileList) {
    super();
    const files = Array.from(fileList);
    if (!files.length) throw new ExportFolderError("the picked folder is empty; pick an export folder");
    this.name = files[0].webkitRelativePath.split("/")[0] || "the picked folder";
    this.files = new Map(files.map((file) => [file.webkitRelativePath.split("/").slice(1).join("/") || file.name, file]));
  }

  async read(relative, missing) {
    const file = this.files.get(relative);
    if (!file) throw new ExportFolderError(missing);
    return new Uint8Array(await file.arrayBuffer());
  }
}
