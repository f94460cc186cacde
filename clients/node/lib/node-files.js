// An export folder on disk, as lib/sidecar.js reads folders: the sidecar's text and the files it
// lists, refusing links and non-files. Node-only (the browser's folder is clients/web/web-folder.js).

import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { ExportFolderError } from "./errors.js";
import { MalformedGraph, scanGraph, utf8 } from "./graph-scan.js";
import { SIDECAR_NAME } from "./sidecar.js";

const HASH_CHUNK = 1 << 20;
// An export is written into `.NAME.partial-XXXX` holding `.owner`, then renamed into place.
const STAGING_NAME = /^\..+\.partial-[0-9a-f]+$/;
const STAGING_OWNER_FILE = ".owner";
const WINDOW = 1 << 16;

export class NodeFolder {
  constructor(folder) {
    if (!folder || !isDirectory(folder)) {
      throw new ExportFolderError(`export folder ${folder} does not exist or is not a folder`);
    }
    this.name = fs.realpathSync(folder);
    if (STAGING_NAME.test(path.basename(this.name)) || fs.existsSync(path.join(this.name, STAGING_OWNER_FILE))) {
      throw new ExportFolderError(
        `${this.name} is the staging folder of an export that did not finish (it was killed, or is still running): ` +
          "it is not an export. Re-export, and use the folder given as --output",
      );
    }
  }

  async sidecarText() {
    const sidecarPath = path.join(this.name, SIDECAR_NAME);
    if (fs.lstatSync(sidecarPath, { throwIfNoEntry: false })?.isSymbolicLink()) {
      throw new ExportFolderError(`${sidecarPath} is a link; copy the real file into the export folder`);
    }
    if (!fs.existsSync(sidecarPath)) {
      throw new ExportFolderError(
        `${this.name} has no ${SIDECAR_NAME}; is it an export folder written by \`gptneo-onnx export\`?`,
      );
    }
    return fs.readFileSync(sidecarPath, "utf8");
  }

  /** A listed file (`relative` checked by sidecar.checkRelative): no link, a regular file. */
  async file(relative, namedBy) {
    const file = path.join(this.name, ...relative.split("/"));
    let stat;
    try {
      stat = fs.lstatSync(file);
    } catch {
      throw new ExportFolderError(`${this.name} is missing ${relative}, which ${namedBy} names; re-copy the export`);
    }
    const real = stat.isSymbolicLink() ? null : fs.realpathSync(file);
    if (real === null || path.relative(this.name, real).startsWith("..")) {
      throw new ExportFolderError(`${relative} in ${this.name} is a link; copy the real file into the export folder`);
    }
    if (!stat.isFile()) throw new ExportFolderError(`${relative} in ${this.name} is not a regular file`);
    return {
      name: relative,
      path: file,
      size: stat.size,
      sha256: async () => sha256(file),
      scan: async () => scanFile(file),
      text: async () => fs.readFileSync(file, "utf8"),
    };
  }
}

function sha256(file) {
  const hash = createHash("sha256");
  const buffer = Buffer.alloc(HASH_CHUNK);
  const fd = fs.openSync(file, "r");
  try {
    let read;
    while ((read = fs.readSync(fd, buffer, 0, HASH_CHUNK, null)) > 0) hash.update(buffer.subarray(0, read));
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest("hex");
}

/** Scan an ONNX file without reading its weights (graph-scan.js), through one cached window. */
function scanFile(file) {
  const fd = fs.openSync(file, "r");
  try {
    return scanGraph(new FileBytes(fd), fs.fstatSync(fd).size);
  } finally {
    fs.closeSync(fd);
  }
}

class FileBytes {
  constructor(fd) {
    this.fd = fd;
    this.buffer = Buffer.alloc(WINDOW);
    this.start = 0;
    this.length = 0;
  }

  byte(position) {
    if (position < this.start || position >= this.start + this.length) {
      this.start = position;
      this.length = fs.readSync(this.fd, this.buffer, 0, WINDOW, position);
      if (this.length === 0) throw new MalformedGraph(`the file ends early at byte ${position}`);
    }
    return this.buffer[position - this.start];
  }

  text(start, end) {
    const bytes = Buffer.alloc(end - start);
    fs.readSync(this.fd, bytes, 0, bytes.length, start);
    return utf8(bytes, start);
  }
}

function isDirectory(folder) {
  try {
    return fs.statSync(folder).isDirectory();
  } catch {
    return false;
  }
}
