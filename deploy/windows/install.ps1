<#
.SYNOPSIS
  Installs the Ollama analytics proxy as the Windows service "OllamaProxy" (run from an administrator PowerShell).

.DESCRIPTION
  Creates .venv in the project directory, installs requirements.txt (pywin32 comes with it on Windows only),
  registers the service (automatic start, restarted by Windows after a failure) and starts it on 127.0.0.1:11434.
  By default the service also starts and supervises `ollama serve` on 127.0.0.1:11435: quit the Ollama tray app
  and remove it from the startup apps first, since it would take port 11434. Logs: ollama_analytics\service.log.

.EXAMPLE
  .\deploy\windows\install.ps1                  # install and start, supervising Ollama
  .\deploy\windows\install.ps1 -ExternalOllama  # Ollama already runs with OLLAMA_HOST=127.0.0.1:11435
  .\deploy\windows\install.ps1 -Remove          # stop and remove the service (data and .venv stay)
#>
param(
    [switch]$Remove,
    [switch]$ExternalOllama,
    [string]$Python = "py"
)
$ErrorActionPreference = "Stop"
$Root = (Resolve-Path "$PSScriptRoot\..\..").Path
$Venv = Join-Path $Root ".venv\Scripts\python.exe"
$Service = Join-Path $Root "deploy\windows\ollama_proxy_service.py"
$Name = "OllamaProxy"
Set-Location $Root

function Invoke-Checked([string]$Exe, [string[]]$Arguments) {
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "$Exe $($Arguments -join ' ') failed with exit code $LASTEXITCODE" }
}

if ($Remove) {
    & $Venv $Service --wait 60 stop
    Invoke-Checked $Venv @($Service, "remove")
    exit 0
}

if (-not (Test-Path $Venv)) { Invoke-Checked $Python @("-m", "venv", ".venv") }
Invoke-Checked $Venv @("-m", "pip", "install", "--quiet", "--upgrade", "pip")
Invoke-Checked $Venv @("-m", "pip", "install", "--quiet", "-r", "requirements.txt")
# pywin32's DLLs where the service host (running as LocalSystem) can load them.
Invoke-Checked $Venv @("-m", "pywin32_postinstall", "-install", "-quiet")

# Settings: the service reads .env in the project directory (see README, Settings).
if (-not (Test-Path ".env")) {
    $lines = @("OLLAMA_PROXY_SERVER=waitress")
    if (-not $ExternalOllama) { $lines += "OLLAMA_PROXY_WITH_OLLAMA=true" }
    $lines | Set-Content -Encoding ascii ".env"
}

Invoke-Checked $Venv @($Service, "--startup", "auto", "install")   # also sets the restart-on-failure actions
# LocalSystem has its own profile: point a supervised Ollama at this user's models instead of an empty store.
$Key = "HKLM:\SYSTEM\CurrentControlSet\Services\$Name"
$Models = if ($env:OLLAMA_MODELS) { $env:OLLAMA_MODELS } else { Join-Path $env:USERPROFILE ".ollama\models" }
Set-ItemProperty -Path $Key -Name Environment -Type MultiString -Value @("OLLAMA_MODELS=$Models")

Invoke-Checked $Venv @($Service, "--wait", "60", "start")
Invoke-RestMethod "http://127.0.0.1:11434/health" | ConvertTo-Json -Depth 4
Write-Host "OllamaProxy is running on http://127.0.0.1:11434 (dashboard: /analytics). Logs: ollama_analytics\service.log"
